"""The distributed property: the gradient a data-parallel engine leaves in
``.grad`` after the user's step is the gradient of the same step on the whole
batch in one process.

``check_distributed(build, step, batch)`` runs the user's own engine, not a
simulation of it: ``world_size`` processes on 127.0.0.1 join a
``torch.distributed`` process group (``backend``, every collective bounded by
``timeout``), each calls ``build()``, wraps the model (``wrap="ddp"``:
``DistributedDataParallel``; ``wrap="fsdp"``: FSDP2 ``fully_shard``), runs
``step(wrapped, shard)`` on its equal slice of ``batch`` along dim 0 and hands
back every parameter's ``.grad`` (an FSDP2 gradient gathered with
``full_tensor()``). In this process the same ``step`` runs on fresh copies of
``build()``'s model: on the whole batch (the reference) and on each rank's shard
alone (the evidence for a diagnosis).

Compared, per parameter ``t`` (float64 NumPy):

* ``r_t``: the whole-batch gradient of the step in float64 (model and floating
  batch tensors cast), the gradient the data-parallel step must reproduce;
* ``g_t^k``: the synchronised gradient rank ``k`` holds; the error is
  ``max_k ||g_t^k - r_t||``.

Tolerance, measured (no table): the data-parallel result is the average of the
ranks' per-shard gradients, each computed in the model's precision ``d``, summed
by the all-reduce in another order than one process sums the whole batch. The
rounding of one shard's gradient is measured here: the per-shard gradient
evaluated in float32 and in float64, ``e_k = ||s32_k - s64_k||``, and the same for
the whole batch; rounding errors scale with the unit roundoff, so a float64 model's
rounding is that of its float32 copy times ``eps64/eps32``. Per tensor::

    sigma_t     = (eps_d / eps_32) sqrt(mean over the W shards and the whole
                  batch of e^2)       (>= the rounding of the ranks' average)
    reduce_t    = eps_d (W - 1) ||mean_k |s64_k| ||   (the all-reduce's own sum)
    tolerance_t = ROUNDING_SIGMAS sqrt(sigma_t^2 + reduce_t^2 + (eps_d ||r_t||)^2)

(the last term, one ulp of the tensor, keeps a tensor whose rounding happened to
cancel from a zero tolerance). A model that cannot run in float64 is compared
with its whole-batch gradient in its own precision, and ``sigma_t`` is the
difference between that and the mean of its per-shard gradients (the same sums
in another order), doubled in the tolerance as both sides round.

Verdicts (status ``"mismatch"`` unless said), with the cause where the evidence
names one:

* the ranks hold different gradients and each holds its own shard's gradient:
  *not synchronised* (``step`` ran the forward through ``model.module``, or under
  ``no_sync()``);
* every rank holds ``r / world_size``: DDP already averages, and the step
  divided the loss by the world size again (or ``world_size x r``: multiplied);
* a rank raised DDP's "Expected to have finished reduction": a parameter got no
  gradient on one rank and did on another (a head used on some shards only) and
  DDP was not told (``find_unused_parameters=True``): the parameters are named
  from the per-shard gradients measured here;
* the average of the per-shard gradients measured here differs from the
  whole-batch gradient (both float64, one process): the step is not a mean over
  its samples (BatchNorm batch statistics without SyncBatchNorm, a loss
  normalised by a count over the batch), so no data-parallel engine can match
  one process: said so, and whether the engine matched the per-shard average;
* ``step`` draws random numbers (two whole-batch runs with other seeds differ):
  ``"nondeterministic"``, the engine is not run;
* a rank raised anything else: ``"error"`` with the rank's exception; a rank that
  did not answer within ``timeout`` (plus a margin): ``"timeout"``; every process
  is ended either way.

The single-process evaluations run inside a process group of world size 1
(gloo, in-memory) when none exists, on the model wrapped as the ranks wrap
theirs (DDP / fully_shard of one process), so a step that reads
``dist.get_world_size()`` or calls ``model.module`` computes what it computes
when training in one process.

Under ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, or a process
group initialised) nothing is spawned: this process is one rank, the launcher's
world size applies, every rank runs the same call and gets the same report
(results are exchanged through the process group's store, each rank computes the
reference itself; ``batch`` must be the same global batch on every rank). There
the reference runs in a process of the launcher's group: a step that reads
``dist.get_world_size()`` sees the world's size in the reference too, so a loss
divided by it is only caught when gradcheck spawns the ranks itself.

State: the user's objects in this process are untouched (the model ``build()``
returns is deep-copied before any step, also when ``build`` returns a cached
one); torch, NumPy and Python random states, grad mode, default dtype and
torch's thread count are restored, also when the check raises.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcheck.errors import (
    GradientMismatchError,
    InvalidArgumentError,
    NonFiniteError,
    UnsupportedInputError,
)
from gradcheck.numeric import tolerance as tl
from gradcheck.result import CheckReport, Location, TensorResult

__all__ = [
    "DEFAULT_TIMEOUT",
    "PROPERTY",
    "WRAPS",
    "Evidence",
    "assert_distributed",
    "check_distributed",
    "report",
    "run",
    "tolerances",
]

PROPERTY = "distributed"
WRAPS = ("ddp", "fsdp")
#: seconds: every collective, and every wait of this process on a rank (plus
#: a margin); a start of the workers gets 30 s more (importing torch)
DEFAULT_TIMEOUT = 120.0

Grads = Mapping[str, "np.ndarray | None"]


# ====================================================================== the core
@dataclass
class Evidence:
    """Everything the verdict is made of (NumPy; None = no gradient)."""

    names: list[str]
    dtype: str
    world_size: int
    #: whole batch, one process, in ``reference_dtype``
    reference: dict[str, np.ndarray | None]
    reference_dtype: str
    #: whole batch, one process, in the model's dtype
    single: dict[str, np.ndarray | None]
    #: per shard, one process: in the model's dtype, in float32, in float64
    #: (float32/float64 lists are empty when the model cannot run in float64)
    shards: list[dict[str, np.ndarray | None]]
    shards32: list[dict[str, np.ndarray | None]]
    shards64: list[dict[str, np.ndarray | None]]
    #: whole batch in float32 (the whole batch's own rounding sample)
    single32: dict[str, np.ndarray | None] | None
    #: what every rank holds after the distributed step
    ranks: list[dict[str, np.ndarray | None]]


def _z(a: np.ndarray | None, like: Sequence[np.ndarray | None]) -> np.ndarray:
    if a is not None:
        return np.asarray(a, dtype=np.float64)
    shape = next((np.shape(x) for x in like if x is not None), ())
    return np.zeros(shape)


def _norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(a)) if a.size else 0.0


@dataclass
class Rounding:
    sigma: float
    reduce: float
    ulp: float
    tolerance: float
    #: the same in float64 (the decomposability test of the shard average)
    tolerance64: float


def tolerances(ev: Evidence) -> dict[str, Rounding]:
    """The measured tolerance of every tensor (module docstring)."""
    eps_d, eps32, eps64 = tl.eps(ev.dtype), tl.eps("float32"), tl.eps("float64")
    w = ev.world_size
    out: dict[str, Rounding] = {}
    for n in ev.names:
        every = [ev.reference[n], ev.single[n], *(s[n] for s in ev.shards)]
        r = _z(ev.reference[n], every)
        if ev.shards64:
            pairs = list(zip(ev.shards32, ev.shards64, strict=True))
            samples = [_norm(_z(a[n], every) - _z(b[n], every)) for a, b in pairs]
            if ev.single32 is not None:
                samples.append(_norm(_z(ev.single32[n], every) - r))
            sigma32 = math.sqrt(sum(s * s for s in samples) / len(samples))
            sigma = sigma32 * eps_d / eps32
            sigma64 = sigma32 * eps64 / eps32
            mean_abs = sum(np.abs(_z(s[n], every)) for s in ev.shards64) / w
            both = 1.0
        else:  # no float64: the same sums in another order, both sides rounding
            mean = sum(_z(s[n], every) for s in ev.shards) / w
            sigma = _norm(mean - _z(ev.single[n], every))
            sigma64 = sigma
            mean_abs = sum(np.abs(_z(s[n], every)) for s in ev.shards) / w
            both = 2.0
        reduce = eps_d * (w - 1) * _norm(np.asarray(mean_abs, dtype=np.float64))
        ulp = eps_d * _norm(r)
        tol = tl.ROUNDING_SIGMAS * math.sqrt(both * sigma**2 + reduce**2 + ulp**2)
        tol64 = tl.ROUNDING_SIGMAS * math.sqrt(
            sigma64**2
            + (eps64 * (w - 1) * _norm(np.asarray(mean_abs))) ** 2
            + (eps64 * _norm(r)) ** 2
        )
        out[n] = Rounding(sigma, reduce, ulp, tol, tol64)
    return out


@dataclass
class TensorVerdict:
    name: str
    shape: tuple[int, ...]
    error: float
    tolerance: float
    rank: int
    index: tuple[int, ...] | None
    reference_value: float | None
    rank_value: float | None
    reference_norm: float
    rank_norm: float
    connected: bool

    @property
    def ratio(self) -> float:
        if self.tolerance > 0:
            return self.error / self.tolerance
        return 0.0 if self.error == 0 else math.inf

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0


def _within(
    ev: Evidence, rounding: Mapping[str, Rounding], got: Callable[[str], Any], want: Any
) -> bool:
    """Every tensor of ``got(name)`` within its tolerance of ``want(name)``."""
    for n in ev.names:
        every = [ev.reference[n], *(r[n] for r in ev.ranks)]
        if _norm(_z(got(n), every) - _z(want(n), every)) > rounding[n].tolerance:
            return False
    return True


def compare(ev: Evidence, rounding: Mapping[str, Rounding]) -> list[TensorVerdict]:
    """Every tensor: the rank furthest from the reference, and where."""
    out = []
    for n in ev.names:
        every = [ev.reference[n], *(r[n] for r in ev.ranks)]
        ref = _z(ev.reference[n], every)
        worst: TensorVerdict | None = None
        for k, rank in enumerate(ev.ranks):
            g = _z(rank[n], every)
            if g.shape != ref.shape:
                raise InvalidArgumentError(
                    f"'{n}' has shape {g.shape} on rank {k} and {ref.shape} in one "
                    "process."
                )
            diff = g - ref
            finite = np.isfinite(diff)
            err = _norm(np.where(finite, diff, 0.0)) if finite.all() else math.inf
            tol = rounding[n].tolerance
            index = rv = gv = None
            if diff.size:
                score = np.where(finite, np.abs(diff), np.inf)
                i = int(np.argmax(score))
                index = tuple(int(x) for x in np.unravel_index(i, diff.shape))
                rv, gv = float(ref.reshape(-1)[i]), float(g.reshape(-1)[i])
            v = TensorVerdict(
                name=n,
                shape=tuple(ref.shape),
                error=err,
                tolerance=tol,
                rank=k,
                index=index,
                reference_value=rv,
                rank_value=gv,
                reference_norm=_norm(ref),
                rank_norm=_norm(np.where(np.isfinite(g), g, 0.0)),
                connected=ev.reference[n] is not None,
            )
            if worst is None or (v.ratio, v.error) > (worst.ratio, worst.error):
                worst = v
        assert worst is not None
        out.append(worst)
    return out


def unused_on_some_rank(ev: Evidence) -> dict[str, list[int]]:
    """Parameters that get a gradient from some shards and none from others:
    {name: [ranks whose shard leaves it without one]}."""
    out: dict[str, list[int]] = {}
    for n in ev.names:
        none = [k for k, s in enumerate(ev.shards) if s[n] is None]
        if none and len(none) < len(ev.shards):
            out[n] = none
    return out


def diagnose(
    ev: Evidence, rounding: Mapping[str, Rounding]
) -> tuple[str | None, list[str]]:
    """The likely cause of a failed comparison: (short cause, notes)."""
    w = ev.world_size
    notes: list[str] = []
    ranks_agree = all(
        _within(ev, rounding, lambda n, r=r: r[n], lambda n: ev.ranks[0][n])
        for r in ev.ranks[1:]
    )
    if not ranks_agree:
        own = all(
            _within(
                ev,
                rounding,
                lambda n, k=k: ev.ranks[k][n],
                lambda n, k=k: ev.shards[k][n],
            )
            for k in range(w)
        )
        if own:
            notes.append(
                "gradients were not synchronised: the ranks hold different gradients "
                "after the step, each its own shard's gradient (as one process "
                "computes it on that shard). Does step call model.module(...)? DDP "
                "all-reduces only the gradients of a forward through the wrapper it "
                "is given (also not under model.no_sync())."
            )
            return "not synchronised", notes
        notes.append(
            "the ranks hold different gradients after the step (beyond rounding): "
            "the engine did not leave one synchronised gradient on every rank."
        )
        return "ranks differ", notes
    g = ev.ranks[0]
    for factor, words in (
        (1.0 / w, f"1/world_size (1/{w})"),
        (float(w), f"world_size ({w}) times"),
    ):
        if _within(ev, rounding, lambda n: g[n], lambda n, f=factor: _scaled(ev, n, f)):
            if factor < 1:
                notes.append(
                    f"the synchronised gradients are exactly {words} the "
                    "single-process gradient: DDP/FSDP already average the gradients "
                    "over the ranks, and step divides the loss by the world size "
                    "again (or sums the loss over the batch where one process "
                    "averages). Remove the division from step."
                )
            else:
                notes.append(
                    f"the synchronised gradients are exactly {words} the "
                    "single-process gradient: step multiplies the loss by the world "
                    "size (DDP/FSDP average the gradients over the ranks, they do "
                    "not sum them)."
                )
            return f"off by {words}", notes
    if ev.shards64:
        mean = {n: _mean([s[n] for s in ev.shards64]) for n in ev.names}
        apart = [
            n
            for n in ev.names
            if _norm(_z(mean[n], [ev.reference[n]]) - _z(ev.reference[n], [mean[n]]))
            > rounding[n].tolerance64
        ]
        if apart:
            matched = _within(ev, rounding, lambda n: g[n], lambda n: mean[n])
            notes.append(
                "even in one process the average of the per-shard gradients differs "
                "from the whole-batch gradient (float64; in "
                + ", ".join(f"'{n}'" for n in apart[:4])
                + (f" and {len(apart) - 4} more" if len(apart) > 4 else "")
                + "): the step is not a mean over its samples - BatchNorm batch "
                "statistics (use torch.nn.SyncBatchNorm), a loss normalised by a "
                "count over the batch, in-batch negatives - so no data-parallel "
                "engine gives one process's gradient. "
                + (
                    "The engine's gradients match the average of the per-shard "
                    "gradients: it synchronised correctly."
                    if matched
                    else "The engine's gradients do not match the average of the "
                    "per-shard gradients either."
                )
            )
            return "step not decomposable over shards", notes
    notes.append(
        "the ranks agree with each other, but their synchronised gradients differ "
        "from the single-process gradient on the whole batch beyond the measured "
        "rounding."
    )
    return None, notes


def _mean(arrays: Sequence[np.ndarray | None]) -> np.ndarray | None:
    present = [a for a in arrays if a is not None]
    if not present:
        return None
    return sum(_z(a, present) for a in arrays) / len(arrays)


def _scaled(ev: Evidence, name: str, factor: float) -> np.ndarray | None:
    r = ev.reference[name]
    return None if r is None else np.asarray(r) * factor


# ====================================================================== reports
@dataclass
class Launch:
    """How the ranks ran (for the notes and the cost)."""

    world_size: int
    wrap: str
    backend: str
    spawn_seconds: float
    rank_seconds: list[float | None]
    torchrun: bool = False
    port: int | None = None
    reused: bool = False
    rank: int | None = None
    #: False: decided before any rank ran (nothing was spawned)
    launched: bool = True

    @property
    def device(self) -> str:
        """Where the ranks computed (nccl: each rank's GPU)."""
        return "cuda" if self.backend == "nccl" else "cpu"

    def notes(self) -> list[str]:
        if not self.launched:
            return [
                f"world size {self.world_size}, wrap {self.wrap}, backend "
                f"{self.backend}: no rank was started (decided in this process)."
            ]
        where = (
            f"under torchrun (this process is rank {self.rank})"
            if self.torchrun
            else f"{self.world_size} processes spawned on 127.0.0.1"
            + (f":{self.port}" if self.port else "")
            + (" (kept from the previous check)" if self.reused else "")
        )
        seconds = ", ".join(
            f"rank {k} " + ("-" if s is None else f"{s:.3f} s")
            for k, s in enumerate(self.rank_seconds)
        )
        return [
            f"world size {self.world_size}, wrap {self.wrap}, backend "
            f"{self.backend}, {where}; start {self.spawn_seconds:.2f} s",
            f"step seconds per rank: {seconds}",
        ]

    def cost(self) -> dict[str, float]:
        out = {"spawn_seconds": self.spawn_seconds, "world_size": self.world_size}
        for k, s in enumerate(self.rank_seconds):
            if s is not None:
                out[f"rank_seconds[{k}]"] = s
        return out


def report(
    ev: Evidence,
    launch: Launch,
    *,
    seed: int,
    rtol: float | None,
    cost: dict[str, float],
    notes: Sequence[str] = (),
) -> CheckReport:
    """The verdict of a completed distributed step."""
    rounding = tolerances(ev)
    if rtol is not None:
        for n, r in rounding.items():
            r.tolerance = rtol * _norm(_z(ev.reference[n], [ev.ranks[0][n]]))
    verdicts = compare(ev, rounding)
    failing = [v for v in verdicts if not v.passed]
    cause, why = diagnose(ev, rounding) if failing else (None, [])
    worst = max(failing or verdicts, key=lambda v: (v.ratio, v.error))
    tensors = [
        TensorResult(
            name=v.name,
            shape=v.shape,
            dtype=ev.dtype,
            device=launch.device,
            kind="parameter",
            grad_norm=v.rank_norm,
            analytical=None,
            numerical=None,
            error=v.error,
            tolerance=v.tolerance,
            status="passed" if v.passed else "mismatch",
            connected=v.connected,
        )
        for v in verdicts
    ]
    out_notes: list[str] = []
    if failing:
        out_notes.append(
            f"MISMATCH ({cause or 'cause not inferred'}) in "
            + ", ".join(f"'{v.name}'" for v in failing[:6])
            + (f" and {len(failing) - 6} more" if len(failing) > 6 else "")
            + f": worst '{worst.name}' on rank {worst.rank}, ||g_rank - g_one_process||"
            f" = {worst.error:.3e} > tolerance {worst.tolerance:.3e}"
            f" (relative {_rel(worst)})."
        )
        out_notes.extend(why)
    else:
        out_notes.append(
            f"every rank's synchronised gradient matches one process on the whole "
            f"batch: worst '{worst.name}' error {worst.error:.3e} <= tolerance "
            f"{worst.tolerance:.3e}."
        )
    unused = unused_on_some_rank(ev)
    if unused and not failing:
        out_notes.append(
            "parameters without a gradient on some ranks' shards ("
            + ", ".join(
                f"'{n}' on rank {_ranks(ks)}" for n, ks in list(unused.items())[:4]
            )
            + "): the engine handled them (find_unused_parameters or FSDP)."
        )
    out_notes.extend(launch.notes())
    out_notes.extend(notes)
    source = (
        f"rtol {rtol:g} x ||r_t||"
        if rtol is not None
        else f"{tl.ROUNDING_SIGMAS:g} x sqrt(sigma_t^2 + reduce_t^2 + (eps ||r_t||)^2)"
        ": sigma_t the rounding of the per-shard and whole-batch gradients measured "
        f"(float32 against float64{', scaled to ' + ev.dtype if ev.dtype != 'float32' else ''}),"
        " reduce_t the all-reduce's sum of the world's gradients"
        if ev.shards64
        else f"{tl.ROUNDING_SIGMAS:g} x sqrt(2 sigma_t^2 + ...): sigma_t the difference "
        f"between the whole-batch and the mean per-shard gradients in {ev.dtype}"
    )
    location = Location(
        tensor=worst.name,
        index=worst.index,
        numerical=worst.reference_value,
        analytical=worst.rank_value,
        error=worst.error,
        tolerance=worst.tolerance,
        quantity=f"gradient on rank {worst.rank} after the {launch.wrap.upper()} "
        f"step (analytical) vs one process on the whole batch in "
        f"{ev.reference_dtype} (numerical), L2 over the tensor; values at its "
        "largest difference",
    )
    return CheckReport(
        property=PROPERTY,
        status="mismatch" if failing else "passed",
        framework="torch",
        device=launch.device,
        dtype=ev.dtype,
        seed=seed,
        mode=launch.wrap,
        error=worst.error,
        tolerance=worst.tolerance,
        tolerance_reason=f"per tensor: {source}.",
        tolerance_terms={
            "sigma": max((r.sigma for r in rounding.values()), default=0.0),
            "reduce": max((r.reduce for r in rounding.values()), default=0.0),
        },
        reference_dtype=ev.reference_dtype,
        location=location if failing else None,
        tensors=tensors,
        notes=out_notes,
        cost={**cost, **launch.cost()},
    )


def _rel(v: TensorVerdict) -> str:
    return f"{v.error / v.reference_norm:.2e}" if v.reference_norm > 0 else "n/a"


def not_run(
    status: str,
    reason: str,
    *,
    dtype: str,
    seed: int,
    launch: Launch,
    cost: dict[str, float],
    notes: Sequence[str] = (),
    location: Location | None = None,
) -> CheckReport:
    """A report without a comparison ("error", "timeout", "nondeterministic") or
    a mismatch found before any gradient was compared (the unused-parameter
    reduction error)."""
    nan = math.nan
    return CheckReport(
        property=PROPERTY,
        status=status,
        framework="torch",
        device=launch.device,
        dtype=dtype,
        seed=seed,
        mode=launch.wrap,
        error=math.inf if status == "mismatch" else nan,
        tolerance=0.0 if status == "mismatch" else nan,
        tolerance_reason="no gradients compared: " + reason.split(":")[0] + ".",
        location=location,
        notes=[reason, *notes, *launch.notes()],
        cost={**cost, **launch.cost()},
    )


def rank_failure(
    outcomes: Sequence[Any],
    ev_unused: Mapping[str, list[int]],
    wrap: str,
    timeout: float,
) -> tuple[str, str, Location | None]:
    """(status, reason, location) for ranks that did not all finish their part."""
    results = [o.result or {} for o in outcomes]
    weights = [r for r in results if r.get("kind") == "weights" and r.get("differing")]
    if weights:
        names = weights[0]["differing"]
        ranks = [o.rank for o in outcomes if (o.result or {}).get("differing")]
        return (
            "error",
            "build() must return the same weights each call: seed inside build() "
            f"(torch.manual_seed before creating the layers). On rank(s) {ranks} it "
            "returned other values than in this process for "
            + ", ".join(f"'{n}'" for n in names[:4])
            + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            + ".",
            None,
        )
    unfinished = [
        o for o in outcomes if "Expected to have finished reduction" in _text(o)
    ]
    mismatched = [
        o for o in outcomes if ev_unused and "collective mismatch" in _text(o)
    ]
    if mismatched and not unfinished:
        k = mismatched[0].rank
        n = next(iter(ev_unused))
        return (
            "mismatch",
            f"{wrap.upper()} could not synchronise: rank {k} failed with a collective "
            "mismatch ('Received data size doesn't match expected size') and "
            "parameters get a gradient on some ranks and none on others: "
            + ", ".join(
                f"'{p}' (no gradient on rank {_ranks(ks)})"
                for p, ks in ev_unused.items()
            )
            + ". The ranks then run different collectives. Make every rank use "
            "every parameter (add the unused head's loss times 0).",
            Location(
                tensor=n,
                quantity=f"gradient of a parameter some ranks never produce ({wrap})",
            ),
        )
    if unfinished:
        k = unfinished[0].rank
        named = {n: ks for n, ks in ev_unused.items()}
        which = (
            ", ".join(
                f"'{n}' (no gradient on rank {_ranks(ks)})" for n, ks in named.items()
            )
            if named
            else "parameters of the model"
        )
        reason = (
            f"{wrap.upper()} could not synchronise: rank {k} raised DDP's 'Expected "
            "to have finished reduction' error - a parameter got a gradient on some "
            f"ranks and none on others: {which}. A head used on some shards only "
            "(a loss computed only when a class is present in the shard) leaves "
            "DDP waiting for a gradient that never comes: on the ranks that used "
            "it the all-reduce hangs, the next forward raises. Pass "
            "wrap_kwargs={'find_unused_parameters': True} (and construct DDP that "
            "way in training), or make every rank use every parameter (add the "
            "unused head's loss times 0)."
        )
        loc = None
        if named:
            n = next(iter(named))
            loc = Location(
                tensor=n,
                quantity=f"gradient of a parameter some ranks never produce ({wrap})",
            )
        return "mismatch", reason, loc
    failed = [o for o in outcomes if o.state in ("error", "died")]
    real = [o for o in failed if not _collateral(o)]
    shown = real or failed
    if shown:
        o = shown[0]
        res = o.result or {}
        phase = res.get("phase")
        text = res.get("error") or (
            "the process ended without an answer; its output: " + o.log.strip()[-600:]
        )
        hint = ""
        if ev_unused:
            hint = (
                " Some parameters get no gradient on some ranks' shards ("
                + ", ".join(
                    f"'{n}' on rank {_ranks(ks)}"
                    for n, ks in list(ev_unused.items())[:4]
                )
                + "): every rank must produce a gradient for every parameter"
                + (
                    " unless DDP has find_unused_parameters=True."
                    if wrap == "ddp"
                    else " (FSDP reduce-scatters each group's gradients together)."
                )
            )
        status = "timeout" if _timed_out(o) else "error"
        during = f"during {phase}" if phase else "(the process ended abruptly)"
        return (
            status,
            f"rank {o.rank} failed {during}: {text.strip()}"
            + _traceback_tail(res)
            + hint,
            None,
        )
    timed = [o for o in outcomes if o.state == "timeout"]
    ranks = [o.rank for o in timed]
    return (
        "timeout",
        f"rank(s) {ranks} did not answer within the timeout ({timeout:g} s for every "
        "collective and every wait): they were killed. A rank waits forever in a "
        "collective the others never join: a step that runs a different number of "
        "forwards/backwards per rank, or a parameter unused on one rank."
        + (
            " Some parameters get no gradient on some ranks' shards ("
            + ", ".join(f"'{n}'" for n in list(ev_unused)[:4])
            + ")."
            if ev_unused
            else ""
        ),
        None,
    )


def _ranks(ks: Sequence[int]) -> str:
    return ", ".join(str(k) for k in ks)


def _timed_out(o: Any) -> bool:
    t = _text(o).lower()
    return o.state == "timeout" or "timed out" in t or "timeout" in t


def _text(o: Any) -> str:
    res = o.result or {}
    return f"{res.get('error', '')}\n{res.get('traceback', '')}\n{o.log}"


def _collateral(o: Any) -> bool:
    """A rank that failed only because a peer left (connection closed)."""
    t = _text(o)
    return "Connection closed by peer" in t or "Connection reset by peer" in t


def _traceback_tail(res: Mapping[str, Any]) -> str:
    tb = (res.get("traceback") or "").strip().splitlines()
    user = [line for line in tb if line.strip().startswith("File ")]
    return f" (last frame: {user[-1].strip()})" if user else ""


# ====================================================================== front doors
def check_distributed(
    build: Callable[[], Any],
    step: Callable[[Any, Any], Any],
    batch: Any,
    *,
    world_size: int = 2,
    backend: str = "gloo",
    wrap: str = "ddp",
    wrap_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
    rtol: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    label: str | None = None,
    repro_dir: Any = None,
) -> CheckReport:
    """Check that a data-parallel step leaves one process's gradient in ``.grad``.

    ``build()`` returns the ``torch.nn.Module`` with the same weights on every
    call (seed inside it) and must be importable - defined at module level: the
    ranks are separate processes that import it by module and name; a lambda or
    a local function is refused with a GradcheckError. ``step(model, shard)`` is
    the user's training step without the optimizer: the forward through the
    ``model`` it is given (the DDP/FSDP-wrapped one), the losses, ``backward()``.

    gradcheck starts ``world_size`` processes on 127.0.0.1 (a free port), joins
    them in a ``torch.distributed`` process group of ``backend`` with
    ``timeout`` seconds on every collective, wraps the model (``wrap="ddp"``:
    ``DistributedDataParallel(model, **wrap_kwargs)``; ``"fsdp"``: FSDP2
    ``fully_shard(model, **wrap_kwargs)``), gives each rank its equal slice of
    ``batch`` along dim 0 (a tensor, or a tuple/list/dict of tensors; the batch
    size must divide by ``world_size``), runs ``step`` and compares every
    parameter's synchronised ``.grad`` with the same step on the whole batch in
    this process, within the measured rounding (module docstring). Never
    hangs: every process is ended, a rank that fails or does not answer in
    ``timeout`` seconds gives status "error" or "timeout" with its exception.

    Under ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
    environment, e.g. ``torchrun --nproc_per_node=2 --nnodes=2 ... script.py``
    on several machines) nothing is spawned: the calling process is one rank,
    rank and world size come from the environment (``world_size`` is ignored),
    every rank must make the same call with the same global ``batch``, and
    every rank returns the same report. ``build`` need not be importable then. The
    check uses the process group already initialised, else initialises one from
    the environment (``env://``, ``backend``, ``timeout``) and leaves it
    initialised for the rest of the process (torchrun's store keeps the first
    group's keys: a second group would meet stale peers).

    ``seed`` seeds torch before every step (same draws on every rank);
    ``rtol`` replaces the measured tolerance (a tensor fails when
    ``||g - r|| > rtol ||r||``). Returns a report with property
    ``"distributed"``, one TensorResult per parameter, the world size, wrap,
    backend and per-rank seconds in its notes and ``cost`` (``spawn_seconds``
    apart from ``seconds``).

    ``repro_dir``: a failing check (mismatch, nondeterministic) writes a repro
    bundle there (``build``/``step`` by name, the batch, world size, backend,
    wrap); ``gradcheck replay`` reruns it. Default: the pytest plugin's
    ``--gradcheck-repro-dir``, else none."""
    from gradcheck import api, repro

    # one set of options: what runs is what the bundle records
    options: dict[str, Any] = dict(
        world_size=world_size,
        backend=backend,
        wrap=wrap,
        wrap_kwargs=wrap_kwargs,
        seed=api._seed(seed),
        rtol=rtol,
        timeout=timeout,
    )
    report = run(build, step, batch, **options)
    report.label = label
    repro.write_distributed_bundle(repro_dir, report, build, step, batch, **options)
    return api._publish(report, label)


def assert_distributed(
    build: Callable[[], Any], step: Callable[[Any, Any], Any], batch: Any, **kwargs: Any
) -> CheckReport:
    """Like :func:`check_distributed`; raises :class:`GradientMismatchError`
    unless the report passed."""
    report = check_distributed(build, step, batch, **kwargs)
    if not report.passed:
        raise GradientMismatchError(report)
    return report


def _validate(
    world_size: Any, backend: Any, wrap: Any, timeout: Any, rtol: Any, wrap_kwargs: Any
) -> None:
    if (
        isinstance(world_size, bool)
        or not isinstance(world_size, int)
        or world_size < 1
    ):
        raise InvalidArgumentError(
            f"world_size must be a positive int (the number of ranks); got "
            f"{world_size!r}."
        )
    if not isinstance(backend, str) or not backend:
        raise InvalidArgumentError(
            f"backend must be a torch.distributed backend name ('gloo' on CPU, "
            f"'nccl' on GPUs); got {backend!r}."
        )
    if wrap not in WRAPS:
        raise InvalidArgumentError(
            f"wrap must be one of {list(WRAPS)} (DistributedDataParallel, FSDP2 "
            f"fully_shard); got {wrap!r}."
        )
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InvalidArgumentError(
            f"timeout must be a positive number of seconds; got {timeout!r}."
        )
    if rtol is not None:
        tl.gradient_rounding("float64", rtol)  # validates
    if wrap_kwargs is not None and not isinstance(wrap_kwargs, Mapping):
        raise InvalidArgumentError(
            f"wrap_kwargs must be a dict of keyword arguments for DDP / fully_shard; "
            f"got {type(wrap_kwargs).__name__}."
        )


def run(
    build: Callable[[], Any],
    step: Callable[[Any, Any], Any],
    batch: Any,
    *,
    world_size: int = 2,
    backend: str = "gloo",
    wrap: str = "ddp",
    wrap_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> CheckReport:
    """The engine behind :func:`check_distributed` (no seed resolution, no
    listeners)."""
    from gradcheck.api import no_raw_exceptions

    started = time.perf_counter()
    for label, fn in (("build", build), ("step", step)):
        if not callable(fn):
            raise UnsupportedInputError(
                f"{label} must be callable ({'build()' if label == 'build' else 'step(model, shard)'}); "
                f"got {type(fn).__name__}."
            )
    _validate(world_size, backend, wrap, timeout, rtol, wrap_kwargs)
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # check_distributed is torch's
        from gradcheck.errors import FrameworkNotInstalledError

        raise FrameworkNotInstalledError(
            "check_distributed needs torch (pip install torch)."
        )
    from gradcheck.backends import torch_distributed as td

    why = td.wrap_available(wrap)
    if why is not None:
        raise UnsupportedInputError(why)
    torchrun = td.in_torchrun()
    if not torchrun:
        td.check_picklable("build", build)
        td.check_picklable("step", step)
    with no_raw_exceptions("check_distributed", build=build, step=step):
        group = contextlib.nullcontext() if torchrun else td.single_process_group()
        with td.UserState(), group:
            return _run(
                td,
                build,
                step,
                batch,
                world_size,
                backend,
                wrap,
                dict(wrap_kwargs or {}),
                seed,
                rtol,
                float(timeout),
                torchrun,
                started,
            )


def _run(
    td: Any,
    build: Callable[[], Any],
    step: Callable[[Any, Any], Any],
    batch: Any,
    world_size: int,
    backend: str,
    wrap: str,
    wrap_kwargs: dict[str, Any],
    seed: int,
    rtol: float | None,
    timeout: float,
    torchrun: bool,
    started: float,
) -> CheckReport:
    if torchrun:
        world_size = td.launched_world_size(world_size)
    first = td.built_model(build)
    want = td.digest(first)
    again = td.digest(td.built_model(build))
    bad = td.differing(want, again)
    if bad:
        raise InvalidArgumentError(
            "build() must return the same weights each call: seed inside build() "
            "(torch.manual_seed before creating the layers). Two calls gave other "
            "values for "
            + ", ".join(f"'{n}'" for n in bad[:4])
            + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            + "."
        )
    n = td.batch_size(batch)
    if n % world_size:
        raise InvalidArgumentError(
            f"the batch has {n} samples along dim 0, which do not split equally "
            f"between world_size={world_size} ranks: pass a batch whose size is a "
            f"multiple of {world_size} (DistributedSampler pads or drops to make "
            "shards equal)."
        )
    dtype = td.precision(first)
    names = td.names_of(first)
    evals = 0

    def grads(data: Any, dt: str | None, s: int = seed) -> dict[str, Any]:
        nonlocal evals
        evals += 1
        return td.gradients(
            first, step, data, dtype=dt, seed=s, wrap=wrap, wrap_kwargs=wrap_kwargs
        )

    single = grads(batch, None)
    again_single = grads(batch, None, seed + 1)
    if not _same(single, again_single):
        launch = Launch(
            world_size, wrap, backend, 0.0, [None] * world_size, launched=False
        )
        return not_run(
            "nondeterministic",
            "step draws random numbers: two runs on the whole batch in one process "
            "with other seeds give other gradients (dropout or noise in training "
            "mode). Each rank draws its own numbers, so the distributed gradient "
            "cannot equal one process's: build the model in eval mode (or without "
            "the random layers) to check the engine.",
            dtype=dtype,
            seed=seed,
            launch=launch,
            cost=_cost(started, evals, 0.0),
        )
    shards = [td.shard(batch, k, world_size) for k in range(world_size)]
    shard_grads = [grads(s, None) for s in shards]
    notes: list[str] = []
    try:
        reference = grads(batch, "float64")
        shards64 = [grads(s, "float64") for s in shards]
        shards32 = (
            shard_grads if dtype == "float32" else [grads(s, "float32") for s in shards]
        )
        single32 = single if dtype == "float32" else grads(batch, "float32")
        reference_dtype = "float64"
    except NonFiniteError:
        raise
    except Exception as exc:  # the model does not run in float64
        reference, shards64, shards32, single32 = single, [], [], None
        reference_dtype = dtype
        notes.append(
            f"the reference is one process in {dtype}: the model does not run in "
            f"float64 ({type(exc).__name__}: {str(exc).strip()[:120]})."
        )
    for name, g in reference.items():
        if g is not None and not np.isfinite(g).all():
            raise NonFiniteError(
                f"the single-process gradient of '{name}' has NaN/Inf elements: the "
                "step's backward overflows or divides by zero; fix that first."
            )
    ev = Evidence(
        names=names,
        dtype=dtype,
        world_size=world_size,
        reference=reference,
        reference_dtype=reference_dtype,
        single=single,
        shards=shard_grads,
        shards32=shards32,
        shards64=shards64,
        single32=single32,
        ranks=[],
    )
    task = {
        "build": build,
        "step": step,
        "batch": td.portable(batch),
        "seed": seed,
        "wrap": wrap,
        "wrap_kwargs": wrap_kwargs,
        "digest": want,
    }
    #: this process's single-process evaluations
    reference_seconds = time.perf_counter() - started
    if torchrun:
        outcomes, facts = td.run_in_torchrun(task, backend, timeout)
    else:
        outcomes, facts = td.run_spawned(task, world_size, backend, timeout)
    spawn = float(facts.get("spawn_seconds", 0.0))
    launch = Launch(
        world_size=world_size,
        wrap=wrap,
        backend=facts.get("backend", backend),
        spawn_seconds=spawn,
        rank_seconds=[
            (o.result or {}).get("seconds") if o.state == "ok" else None
            for o in outcomes
        ],
        torchrun=bool(facts.get("torchrun")),
        port=facts.get("port"),
        reused=bool(facts.get("reused")),
        rank=facts.get("rank"),
    )
    unused = unused_on_some_rank(ev)
    if not all(o.state == "ok" for o in outcomes):
        status, reason, location = rank_failure(outcomes, unused, wrap, timeout)
        return not_run(
            status,
            reason,
            dtype=dtype,
            seed=seed,
            launch=launch,
            cost=_cost(started, evals, spawn, world_size),
            notes=notes,
            location=location,
        )
    ev.ranks = [o.result["grads"] for o in outcomes]
    return report(
        ev,
        launch,
        seed=seed,
        rtol=rtol,
        cost={
            **_cost(started, evals, spawn, world_size),
            "reference_seconds": reference_seconds,
        },
        notes=notes,
    )


def _same(a: Grads, b: Grads) -> bool:
    for n in a:
        x, y = a[n], b[n]
        if (x is None) != (y is None):
            return False
        if x is not None and not np.array_equal(x, y, equal_nan=True):
            return False
    return True


def _cost(
    started: float, evaluations: int, spawn: float, ranks: int = 0
) -> dict[str, float]:
    """Steps run (in this process and one per rank) and seconds apart from the
    ranks' start."""
    total = time.perf_counter() - started
    return {
        "forward": float(evaluations + ranks),
        "backward": float(evaluations + ranks),
        "seconds": max(0.0, total - spawn),
    }
