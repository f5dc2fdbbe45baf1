"""OpInfo sweep: gradcheck against torch.autograd.gradcheck on PyTorch's op database.

For every op in ``torch.testing._internal.common_methods_invocations.op_db`` that
supports autograd in float64 on CPU, take up to ``--max-samples`` of its float64
sample inputs (spread evenly over the op's sample list) and

1. run ``torch.autograd.gradcheck`` (its default settings, plus the op's own
   ``gradcheck_nondet_tol`` / ``gradcheck_fast_mode`` where the OpInfo sets them)
   and ``gradcheck.check_gradients`` on the same function and inputs, timing both;
2. cast the sample to float32 (every float64 tensor and dtype in it) and run
   ``gradcheck.check_gradients`` again: torch's checker cannot judge float32.

The function checked is built exactly as PyTorch's ``test_fn_grad`` builds it
(``TestGradients._check_helper`` in torch/testing/_internal/common_utils.py): its
arguments are the tensors of the sample that require grad; it puts them back into
the sample, calls ``op.gradcheck_wrapper(op.get_op(), ...)`` and applies
``sample.output_process_fn_grad``.

Verdicts are compared where both tools gave one (torch: passed or failed;
gradcheck: "passed" or any failing status). Disagreements are explained by
measurements the sweep makes on the sample (see :func:`diagnose` and
:func:`explain`), never by an op's name. A sample where gradcheck says
"mismatch", torch passes and no measurement explains it is a "gradcheck false
alarm"; any other unexplained disagreement is "real difference -- investigate". A tool that refuses a sample (gradcheck's
GradcheckError on unusable input, torch raising something other than its own
GradcheckError) is counted separately, not as agreement or disagreement.

Beyond first-order gradients of float64 samples (issue 13), the sweep runs three
more kinds of comparison, each against torch's own checker on the same function:

* ``complex``: the op's complex128 samples (ops whose backward supports
  complex128 on CPU), torch.autograd.gradcheck against gradcheck.check_gradients
  (complex tensors checked as their real and imaginary parts; both use the
  Wirtinger convention of torch);
* ``order2``: the float64 samples of ops with ``supports_gradgrad``,
  torch.autograd.gradgradcheck (its defaults, the OpInfo's nondet_tol / fast mode)
  against gradcheck.check_gradients(order=2);
* ``forward``: the float64 samples of ops with ``supports_forward_ad``,
  torch.autograd.gradcheck(check_forward_ad=True, check_backward_ad=False)
  against gradcheck.check_gradients(ad="forward").

Each is compared like the float64 one (``--checks`` picks them); agreement is
reported per kind and over everything.

Usage::

    PYTHONPATH=. python benchmarks/opinfo_sweep.py                # every op
    PYTHONPATH=. python benchmarks/opinfo_sweep.py --ops abs,matmul --max-samples 2
    PYTHONPATH=. python benchmarks/opinfo_sweep.py --workers 2 --json reports/opinfo.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
import traceback
import unittest
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd.gradcheck import GradcheckError as TorchGradcheckError

import gradcheck
from gradcheck.errors import GradcheckError

#: Default number of samples per op: the first, the last and evenly spaced ones
#: between (OpInfo sample lists run from small/simple to large/exotic, and some ops
#: have 1,440 samples; 4 keeps the full sweep to ~2,000 samples).
DEFAULT_MAX_SAMPLES = 4
#: Wall-clock budget per tool call (seconds). A call past it is recorded as a
#: timeout for that tool; nothing in the default sweep comes close (the slowest
#: sample takes a few seconds), so it only guards against hangs.
DEFAULT_BUDGET_S = 120.0

#: Beyond these, torch's default slow mode (2 forwards per input element, 1
#: backward per output element, a dense Jacobian) is replaced by its fast mode.
TORCH_SLOW_MAX_EVALS = 50_000
TORCH_SLOW_MAX_JAC = 50_000_000
#: Address-space cap per sweep process (GiB; the CLI sets it, 0 = none): an op
#: that tries to allocate more fails with an error instead of taking the machine.
DEFAULT_MEMORY_GB = 6.0

#: Ops not run at all, with the reason. Keep this short: a failure is data, not a
#: reason to skip.
SKIP_OPS: dict[str, str] = {}

#: Ops that are piecewise by definition (fnmatch patterns on op ids, with why).
#: Text only: it is added to the explanation of a disagreement that a
#: measurement (:func:`measure_kink`) already classified as a kink. A name never
#: classifies: a "nondifferentiable" verdict whose kink the measurement does not
#: find stays "real difference -- investigate", whatever the op.
PIECEWISE_OPS: tuple[tuple[str, str], ...] = (
    ("ceil", "step function (jumps at integers)"),
    ("floor", "step function (jumps at integers)"),
    (
        "round*",
        "step function (jumps at half-integers, or at half units of 10^-decimals)",
    ),
    ("trunc", "step function (jumps at integers)"),
    ("frac", "sawtooth (jumps at integers)"),
    ("sign", "step function (jump at 0)"),
    ("sgn", "step function (jump at 0)"),
    ("angle", "real input: 0 or pi, jump at 0"),
    ("div.floor_rounding", "floor of a quotient: jumps"),
    ("div.trunc_rounding", "trunc of a quotient: jumps"),
    ("floor_divide", "floor of a quotient: jumps"),
    ("remainder", "sawtooth: jumps"),
    ("fmod", "sawtooth: jumps"),
    ("copysign", "jump where the sign source crosses 0"),
    ("heaviside", "step function"),
    ("abs", "kink at 0"),
    ("clamp*", "kinks at the bounds"),
    ("clip", "kinks at the bounds"),
    ("max*", "kinks at ties"),
    ("min*", "kinks at ties"),
    ("amax", "kinks at ties"),
    ("amin", "kinks at ties"),
    ("aminmax", "kinks at ties"),
    ("fmax", "kinks at ties"),
    ("fmin", "kinks at ties"),
    ("cummax", "kinks at ties"),
    ("cummin", "kinks at ties"),
    ("sort", "permutation changes at ties"),
    ("msort", "permutation changes at ties"),
    ("topk", "selection changes at ties"),
    ("kthvalue", "selection changes at ties"),
    ("median", "selection changes at ties"),
    ("nanmedian", "selection changes at ties"),
    ("masked.median", "selection changes at ties"),
    ("mode", "selection changes at ties"),
    ("nn.functional.relu*", "kink at 0"),
    ("nn.functional.leaky_relu", "kink at 0"),
    ("nn.functional.prelu", "kink at 0"),
    ("nn.functional.hardtanh", "kinks at +-1"),
    ("nn.functional.hardshrink", "jumps at +-lambda"),
    ("nn.functional.softshrink", "kinks at +-lambda"),
    ("nn.functional.threshold", "jump at the threshold"),
    ("nn.functional.hardsigmoid", "kinks at +-3"),
    ("nn.functional.hardswish", "kinks at +-3"),
    ("nn.functional.elu", "kink at 0 (alpha != 1)"),
    ("nn.functional.celu", "kink at 0"),
    ("nn.functional.selu", "kink at 0"),
    ("*max_pool*", "argmax changes at ties"),
    ("*max_unpool*", "scatter by argmax indices"),
    ("cdist", "|x - y|^p: kinks at 0 (p <= 1), piecewise constant for p = 0"),
    ("dist", "|x - y|^p: kinks at 0"),
    ("nn.functional.pdist", "|x - y|^p: kinks at 0"),
    ("nn.functional.pairwise_distance", "|x - y|^p: kinks at 0"),
    ("norm", "p-norms: kinks at 0 and at ties (p = inf)"),
    ("norm.*", "p-norms: kinks at 0 and at ties (p = inf)"),
    ("linalg.norm*", "p-norms: kinks at 0 and at ties (p = inf)"),
    ("linalg.vector_norm", "p-norms: kinks at 0 and at ties (p = inf)"),
    ("linalg.matrix_norm", "nuclear/inf norms: kinks"),
    ("masked.norm", "p-norms: kinks at 0 and at ties (p = inf)"),
    ("renorm", "rescales only above maxnorm: kink"),
    ("nn.functional.l1_loss", "|x - y|: kink at 0"),
    ("nn.functional.smooth_l1_loss", "C1 only at |x - y| = beta"),
    ("nn.functional.huber_loss", "C1 only at |x - y| = delta"),
    (
        "nn.functional.hinge_embedding_loss",
        "max(0, margin - x): kink; in the target (differentiated too), a jump of "
        "the value wherever it leaves +-1 (the branch is chosen by target == +-1), "
        "the same on both sides",
    ),
    ("nn.functional.margin_ranking_loss", "max(0, ...): kink"),
    ("nn.functional.multi_margin_loss", "max(0, ...): kinks"),
    ("nn.functional.multilabel_margin_loss", "max(0, ...): kinks"),
    ("nn.functional.triplet_margin*", "max(0, ...): kinks"),
    ("nn.functional.grid_sample", "bilinear interpolation: kinks at grid points"),
    ("grid_sampler_*", "bilinear interpolation: kinks at grid points"),
    ("nn.functional.interpolate*", "nearest/linear interpolation: jumps/kinks"),
    ("searchsorted", "step function"),
    ("bucketize", "step function"),
)

#: Hand-checked notes on disagreements, by op id (torch 2.13 CPU), each with a
#: one-line reproduction. Text only: a note is added to the explanation of a
#: disagreement that a measurement already classified (see :func:`explain`); it
#: never classifies one, so a new false alarm on the same op is still counted.
NOTES: dict[str, str] = {
    "nn.functional.hardsigmoid": (
        "hardsigmoid's float64 CPU backward multiplies by float32(1/6) = "
        "0.16666667163 while the forward's slope is exactly 1/6 (check: "
        "autograd.grad(hardsigmoid(x).sum(), x) for x = 0.5 in float64); relative "
        "error 3e-8, below torch's rtol=1e-3"
    ),
}

#: Hand-checked notes on disagreements of the complex / order-2 / forward
#: comparisons, by (kind, op id), each with how it was measured. Text: added to the
#: explanation; a note that begins "a gradcheck false alarm" also files a
#: disagreement no measurement explained under FALSE_ALARM (never the reverse: a
#: note cannot excuse gradcheck).
EXTRA_NOTES: dict[tuple[str, str], str] = {
    ("complex", "logsumexp"): (
        "a gradcheck false alarm: sample #14's inputs reach |z| = 2.5e6, so "
        "gradcheck's relative step (eps^(1/3) x the tensor's scale, ~15) spans "
        "several periods of exp(i Im z) (2 pi): its finite differences of the "
        "imaginary part are not a derivative (numerical -0.546 against the exact "
        "1.0); torch's absolute step 1e-6 resolves it"
    ),
}

#: Hand-checked explanations of float32 failures where float64 passed, by op. Empty
#: since gradcheck measures the float32 backward's own rounding by draws
#: (finite_difference._rounding_draws); the four it used to hold (logcumsumexp at
#: x = 1e4; layer_norm, group_norm and normalize cancelling O(1) terms to ~0) are
#: reproduced in tests/test_torch_gradients.py, each next to a planted bug.
INVESTIGATED_FLOAT32: dict[str, str] = {}

#: Ops known to take minutes (torch's slow mode on ctc_loss: ~3 min for 4
#: samples); submitted first so a pool does not end waiting on them alone.
SLOW_OPS = ("nn.functional.ctc_loss", "nn.functional.scaled_dot_product_attention")

#: Markdown cells are cut to this many characters (the JSON keeps everything).
CELL_CHARS = 220

#: The measurements that classify a disagreement (see :func:`diagnose`).
#: Kinks: steps along one input element, relative to the element's scale, from
#: well above gradcheck's own (~6e-6, eps^(1/3)) down to where float64 rounding
#: takes over.
KINK_STEPS = tuple(10.0**-j for j in range(2, 8))
#: A gap between one-sided difference quotients counts above this many float64
#: roundings of the function's values (divided by the step).
KINK_NOISE = 1e3
#: A smooth function's gap shrinks ~10x per decade of step (it is ~f'' h); a gap
#: that keeps at least this share of itself over a decade is a kink or a jump.
KINK_KEEPS = 0.5
#: Backward errors: central differences at these steps (relative to the
#: element's scale) give the numerical column; their spread is its uncertainty.
CONFIRM_STEPS = (1e-4, 1e-5, 1e-6)
#: The backward's error must exceed that uncertainty this many times.
CONFIRM_MARGIN = 10.0
#: Cotangents: every output element up to this many, else seeded Gaussian ones.
CONFIRM_MAX_ROWS = 64
CONFIRM_RANDOM_ROWS = 8


# ---------------------------------------------------------------------------------
# Ops and samples
# ---------------------------------------------------------------------------------
def op_db() -> list[Any]:
    """PyTorch's OpInfo database (imported lazily: it takes ~1.5 s and needs
    ``expecttest``)."""
    from torch.testing._internal.common_methods_invocations import op_db as db

    return list(db)


def op_id(op: Any) -> str:
    """An op's name as PyTorch's test ids spell it: ``name`` or ``name.variant``."""
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


@dataclass
class Selection:
    """The ops to run and why the others in op_db were left out."""

    ops: list[Any]
    not_differentiable: list[str] = field(default_factory=list)
    no_float64_backward: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    total: int = 0


def select_ops(
    filters: Sequence[str] | None = None,
    *,
    exact: bool = False,
    limit: int | None = None,
    db: Sequence[Any] | None = None,
) -> Selection:
    """The differentiable ops of op_db, optionally filtered.

    ``filters``: op ids (``name`` or ``name.variant``) to keep: substrings by
    default, whole ids with ``exact``.
    Left out and counted: ops without ``supports_autograd`` (torch's test_fn_grad
    skips them too), ops whose backward does not support float64 on CPU (the
    reference dtype of torch's checker; complex-only ops land here), and SKIP_OPS.
    """
    db = op_db() if db is None else db
    sel = Selection(ops=[])
    for op in db:
        oid = op_id(op)
        if filters:
            if exact:
                keep = oid in filters
            else:
                keep = any(f in oid for f in filters)
            if not keep:
                continue
        sel.total += 1
        if not op.supports_autograd:
            sel.not_differentiable.append(oid)
        elif torch.float64 not in op.supported_backward_dtypes("cpu"):
            sel.no_float64_backward.append(oid)
        elif oid in SKIP_OPS:
            sel.skipped[oid] = SKIP_OPS[oid]
        else:
            sel.ops.append(op)
    if limit is not None:
        sel.ops = sel.ops[:limit]
    return sel


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def samples_for(
    op: Any, max_samples: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[int, list[tuple]]:
    """(number of samples of ``dtype`` the op has, [(index, sample)] chosen from
    them).

    torch is seeded before generating, so an op's samples do not depend on which
    other ops ran before it."""
    torch.manual_seed(seed)
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    return len(samples), [(i, samples[i]) for i in _spread(len(samples), max_samples)]


def _is_tensor_list(x: Any) -> bool:
    return (
        isinstance(x, (list, tuple))
        and len(x) > 0
        and all(isinstance(t, torch.Tensor) for t in x)
    )


def grad_args(sample: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a sample that require grad, in test_fn_grad's order."""
    first = list(sample.input) if _is_tensor_list(sample.input) else [sample.input]
    everything = [*first, *sample.args, *sample.kwargs.values()]
    return tuple(
        x for x in everything if isinstance(x, torch.Tensor) and x.requires_grad
    )


def make_fn(op: Any, sample: Any) -> Callable[..., Any]:
    """test_fn_grad's function: the grad-requiring tensors in, the op's output out
    (through ``op.gradcheck_wrapper`` and ``sample.output_process_fn_grad``).

    One deliberate difference from test_fn_grad: which of the sample's tensors are
    replaced by the function's arguments is decided here, once, not by reading
    ``requires_grad`` on every call. Under gradcheck's float64 reference
    evaluations of a float32 function, ``t.requires_grad`` of a float32 tensor the
    function closes over reads False (the promotion mode casts ``t`` under no_grad
    before the attribute is read), so test_fn_grad's version would put the
    unperturbed sample tensor back and every float32 check would fail with
    numerical = 0. The function is the same; only that lookup moved.
    """
    variant = op.get_op()

    def slots(x: Any) -> Any:
        # True where the function's next argument goes, False where x stays
        if _is_tensor_list(x):
            return [t.requires_grad for t in x]
        return isinstance(x, torch.Tensor) and x.requires_grad

    first_slots = slots(sample.input)
    arg_slots = [slots(x) for x in sample.args]
    kwarg_slots = {k: slots(x) for k, x in sample.kwargs.items()}

    def recompose(inputs, x, slot, idx):
        if isinstance(slot, list):
            out = []
            for t, take in zip(x, slot, strict=True):
                out.append(inputs[idx] if take else t)
                idx += take
            return out, idx
        if slot:
            return inputs[idx], idx + 1
        return x, idx

    def fn(*inputs):
        first, idx = recompose(inputs, sample.input, first_slots, 0)
        args = [first]
        for x, slot in zip(sample.args, arg_slots, strict=True):
            value, idx = recompose(inputs, x, slot, idx)
            args.append(value)
        kwargs = {}
        for k, x in sample.kwargs.items():
            kwargs[k], idx = recompose(inputs, x, kwarg_slots[k], idx)
        out = op.gradcheck_wrapper(variant, *args, **kwargs)
        return sample.output_process_fn_grad(out)

    return fn


def to_float32(sample: Any) -> Any:
    """The sample with every float64 tensor (and ``dtype=torch.float64`` argument)
    cast to float32; requires_grad is kept. Casting the non-differentiated float
    tensors too keeps type promotion from quietly running the op in float64."""

    def cast(x):
        if isinstance(x, torch.dtype):
            return torch.float32 if x == torch.float64 else x
        if x.dtype != torch.float64:
            return x
        return x.detach().to(torch.float32).requires_grad_(x.requires_grad)

    return sample.transform(cast)


def describe(sample: Any) -> str:
    """A short description: the shapes of the differentiated tensors and the
    sample's other arguments."""

    def fmt(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return "T" + str(tuple(x.shape)).replace(" ", "")
        if _is_tensor_list(x):
            return "[" + ",".join(fmt(t) for t in x) + "]"
        if isinstance(x, (list, tuple)):
            return "(" + ",".join(fmt(t) for t in x) + ")"
        if callable(x):
            return getattr(x, "__name__", type(x).__name__)
        return repr(x)

    parts = [fmt(sample.input), *(fmt(a) for a in sample.args)]
    parts += [f"{k}={fmt(v)}" for k, v in sample.kwargs.items()]
    text = ", ".join(parts)
    if sample.name:
        text = f"{sample.name}: {text}"
    return text if len(text) <= 120 else text[:117] + "..."


def torch_test_marks(op: Any) -> list[str]:
    """Skips/expected failures that PyTorch's own suite puts on this op's float64
    CPU gradient test (test_fn_grad), e.g. ``xfail`` or ``skip: <reason>``."""
    marks = []
    for info in getattr(op, "decorators", ()) or ():
        # a bare decorator (not a DecorateInfo) applies to every test of the op
        decorators = getattr(info, "decorators", [info])
        if not getattr(info, "active_if", True):
            continue
        if getattr(info, "test_name", None) not in (None, "test_fn_grad"):
            continue
        if getattr(info, "cls_name", None) not in (None, "TestBwdGradients"):
            continue
        if getattr(info, "device_type", None) not in (None, "cpu"):
            continue
        dtypes = getattr(info, "dtypes", None)
        if dtypes is not None and torch.float64 not in dtypes:
            continue
        for d in decorators:
            if d is unittest.expectedFailure:
                marks.append("xfail")
            elif "skip" in getattr(d, "__qualname__", ""):
                cells = [c.cell_contents for c in (d.__closure__ or ())]
                reason = next((c for c in cells if isinstance(c, str)), "")
                marks.append(f"skip: {reason}" if reason else "skip")
    return marks


# ---------------------------------------------------------------------------------
# Running the two checkers
# ---------------------------------------------------------------------------------
class SweepTimeout(BaseException):
    """A tool call ran past its budget. A BaseException, so that neither checker's
    ``except Exception`` (gradcheck's float64 fallback, torch's retries) eats it."""


@contextlib.contextmanager
def time_budget(seconds: float | None):
    """Raise SweepTimeout after ``seconds`` of wall time (SIGALRM; main thread of a
    POSIX process only, elsewhere no budget is enforced)."""
    usable = (
        seconds
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    )
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise SweepTimeout(f"over the {seconds:g} s budget")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _first_line(text: Any, n: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


@dataclass
class Outcome:
    """One tool's result on one sample.

    ``verdict``: "passed" / "failed" (a verdict); "refused" (the tool declined the
    input: gradcheck's GradcheckError, torch raising something other than its own
    GradcheckError); "fn error" (the sample's function itself raised inside
    gradcheck); "crash" (an exception raised in gradcheck's own code: a bug);
    "timeout"; "skipped". ``status`` is gradcheck's report status or, for torch,
    the kind of failure (see :func:`torch_failure_kind`)."""

    verdict: str
    status: str = ""
    message: str = ""
    seconds: float = 0.0
    forward: int | None = None
    backward: int | None = None
    notes: list[str] = field(default_factory=list)
    #: gradcheck's mode and its worst location's numbers, where it has them.
    mode: str = ""
    numerical: float | None = None
    analytical: float | None = None
    error: float | None = None
    #: gradcheck's worst element: the tensor's name ("inputs[k]") and its index.
    tensor: str = ""
    index: list[int] | None = None


def torch_failure_kind(message: str) -> str:
    """What torch's checker objected to, from its GradcheckError message."""
    m = message.lower()
    if "jacobian mismatch" in m:
        return "jacobian"
    if "not reentrant" in m:
        return "reentrant"
    if "undefined" in m:
        return "undefined-grad"
    if "expected to be zero" in m:
        return "nonzero-numerical"
    if "dtype" in m or "incorrect type" in m or "incorrect size" in m:
        return "grad-metadata"
    if "backward not multiplied" in m:
        return "not-multiplied"
    return "other"


def output_numel(fn: Callable, args: Sequence[torch.Tensor]) -> int | None:
    """Real elements in fn's floating outputs (complex counts twice), or None if
    fn fails (the checkers will then report the failure themselves)."""
    try:
        with torch.no_grad():
            out = fn(*args)
    except Exception:
        return None
    n = 0
    for x in flatten(out):
        if x.is_complex():
            n += 2 * x.numel()
        elif x.is_floating_point():
            n += x.numel()
    return n


def flatten(out: Any) -> list[torch.Tensor]:
    """The tensors of an output structure, depth first (dict values in order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten(v)]
    return []


def torch_slow_mode_too_big(n_in: int, n_out: int | None) -> bool:
    """Whether torch's default (slow, full-Jacobian) mode is out of reach: it runs
    2 forwards per input element and 1 backward per output element and holds the
    dense n_in x n_out Jacobian twice. A few OpInfo samples (grid_sampler_3d's
    20x11x12x13x14 input) would need ~10^6 backwards and terabytes."""
    if n_out is None:
        return False
    return 2 * n_in + n_out > TORCH_SLOW_MAX_EVALS or n_in * n_out > TORCH_SLOW_MAX_JAC


def run_torch(
    op: Any,
    fn: Callable,
    args: Sequence[torch.Tensor],
    budget: float | None,
    *,
    n_out: int | None = None,
    kind: str = "float64",
) -> Outcome:
    """torch.autograd.gradcheck with its defaults and the op's own settings.

    raise_exception=True (equivalent verdict to False) so the failure's message can
    say what torch objected to. Where the default slow mode is out of reach
    (torch_slow_mode_too_big), fast mode is used, as torch's own test suite does
    for every op, and the outcome's notes say so."""
    kwargs = {"nondet_tol": op.gradcheck_nondet_tol or 0.0}
    notes = []
    if op.gradcheck_fast_mode is not None:
        kwargs["fast_mode"] = bool(op.gradcheck_fast_mode)
        notes.append(f"fast_mode={kwargs['fast_mode']} (OpInfo)")
    elif torch_slow_mode_too_big(sum(a.numel() for a in args), n_out):
        kwargs["fast_mode"] = True
        notes.append(FAST_FALLBACK)
    inputs = tuple(a.detach().clone().requires_grad_(True) for a in args)
    check = torch.autograd.gradcheck
    if kind == "order2":  # gradgradcheck's defaults (check_batched_grad off)
        check = torch.autograd.gradgradcheck
    elif kind == "forward":  # forward-mode values only, as test_forward_mode_AD
        kwargs.update(
            check_forward_ad=True,
            check_backward_ad=False,
            check_undefined_grad=False,
            check_batched_grad=False,
        )
    t0 = time.perf_counter()
    try:
        with time_budget(budget):
            check(fn, inputs, raise_exception=True, **kwargs)
        return Outcome(
            "passed", "passed", seconds=time.perf_counter() - t0, notes=notes
        )
    except TorchGradcheckError as exc:
        msg = _first_line(exc)
        kind = torch_failure_kind(msg)
        return Outcome("failed", kind, msg, time.perf_counter() - t0, notes=notes)
    except SweepTimeout as exc:
        return Outcome("timeout", "timeout", str(exc), time.perf_counter() - t0)
    except Exception as exc:  # the op or torch's checker could not run
        msg = _first_line(f"{type(exc).__name__}: {exc}")
        return Outcome(
            "refused", type(exc).__name__, msg, time.perf_counter() - t0, notes=notes
        )


FAST_FALLBACK = "fast_mode=True (fallback: slow mode out of reach)"
_GRADCHECK_DIR = os.path.dirname(gradcheck.__file__)


def _raised_in_gradcheck(exc: BaseException) -> bool:
    """Whether an exception came from gradcheck's own code rather than from the
    function under test: the innermost frame that is either gradcheck's or this
    script's (the sample's function lives here) decides; numpy/torch frames in
    between are skipped."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.startswith(_GRADCHECK_DIR):
            return True
        if os.path.abspath(frame.filename) == os.path.abspath(__file__):
            return False
    return True


def run_gradcheck(
    fn: Callable,
    args: Sequence[torch.Tensor],
    seed: int,
    budget: float | None,
    **kwargs: Any,
) -> Outcome:
    """gradcheck.check_gradients with its defaults (``kwargs`` are passed on)."""
    inputs = tuple(a.detach().clone().requires_grad_(True) for a in args)
    t0 = time.perf_counter()
    try:
        with time_budget(budget):
            report = gradcheck.check_gradients(fn, inputs, seed=seed, **kwargs)
    except GradcheckError as exc:
        msg = _first_line(f"{type(exc).__name__}: {exc}")
        return Outcome("refused", type(exc).__name__, msg, time.perf_counter() - t0)
    except SweepTimeout as exc:
        return Outcome("timeout", "timeout", str(exc), time.perf_counter() - t0)
    except Exception as exc:  # recorded, never hidden: a crash is a gradcheck bug
        verdict = "crash" if _raised_in_gradcheck(exc) else "fn error"
        msg = _first_line(f"{type(exc).__name__}: {exc}")
        return Outcome(verdict, verdict, msg, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    loc = report.location
    return Outcome(
        "passed" if report.passed else "failed",
        report.status,
        "" if report.passed else _first_line(report.message(), 1200),
        seconds,
        int(report.cost.get("forward", 0)),
        int(report.cost.get("backward", 0)),
        [_first_line(n, 300) for n in report.notes],
        mode=report.mode,
        numerical=None if loc is None else loc.numerical,
        analytical=None if loc is None else loc.analytical,
        error=None if loc is None else loc.error,
        tensor="" if loc is None else loc.tensor,
        index=None if loc is None or loc.index is None else list(loc.index),
    )


# ---------------------------------------------------------------------------------
# Diagnosis and classification
# ---------------------------------------------------------------------------------
@dataclass
class SampleResult:
    op: str
    index: int
    sample: str
    torch64: Outcome
    gc64: Outcome
    gc32: Outcome
    #: "agree", "disagree", or "not compared" (a tool gave no verdict).
    comparison: str = ""
    category: str = ""
    explanation: str = ""
    #: What the follow-up runs of a disagreement found (see :func:`diagnose`).
    evidence: dict[str, Any] = field(default_factory=dict)
    #: Explanation of a float32 failure where float64 passed.
    float32_explanation: str = ""


def piecewise_reason(oid: str) -> str | None:
    """Why the op is piecewise (PIECEWISE_OPS), or None."""
    for pattern, reason in PIECEWISE_OPS:
        if fnmatch.fnmatchcase(oid, pattern):
            return reason
    return None


def compare(torch64: Outcome, gc64: Outcome) -> str:
    verdicts = ("passed", "failed")
    if torch64.verdict not in verdicts or gc64.verdict not in verdicts:
        return "not compared"
    return "agree" if torch64.verdict == gc64.verdict else "disagree"


def _output_positions(fn: Callable, args: Sequence[torch.Tensor]) -> tuple[list, list]:
    """(positions of floating outputs that require grad, positions of floating
    outputs that do not), in flatten()'s order, from one grad-enabled call."""
    inputs = [a.detach().clone().requires_grad_(True) for a in args]
    with torch.enable_grad():
        outs = flatten(fn(*inputs))
    diff, nondiff = [], []
    for i, o in enumerate(outs):
        if o.is_floating_point() or o.is_complex():
            (diff if o.requires_grad else nondiff).append(i)
    return diff, nondiff


def _select_outputs(fn: Callable, positions: Sequence[int]) -> Callable:
    """fn with only the outputs at ``positions`` (fixed once, never re-read)."""

    def selected(*inputs):
        outs = flatten(fn(*inputs))
        return tuple(outs[i] for i in positions)

    return selected


def _concat_outputs(fn: Callable, positions: Sequence[int]) -> Callable:
    """fn's outputs at ``positions`` as one real vector: every output's gradient
    is then defined (zero where unused) when torch computes a Jacobian row."""

    def concatenated(*inputs):
        outs = flatten(fn(*inputs))
        parts = []
        for i in positions:
            o = outs[i]
            parts.append((torch.view_as_real(o) if o.is_complex() else o).reshape(-1))
        return torch.cat(parts)

    return concatenated


def _located_element(
    g: Outcome, args: Sequence[torch.Tensor]
) -> tuple[int, tuple[int, ...]] | None:
    """(input position, index) of gradcheck's worst element where it names a real
    floating input of the function ("inputs[k]" and an index in its shape)."""
    m = re.fullmatch(r"inputs\[(\d+)\]", g.tensor or "")
    if m is None or g.index is None or int(m.group(1)) >= len(args):
        return None
    k, index = int(m.group(1)), tuple(int(i) for i in g.index)
    x = args[k]
    if not x.is_floating_point() or len(index) != x.dim():
        return None
    if any(not 0 <= i < n for i, n in zip(index, x.shape, strict=True)):
        return None
    return k, index


def _output_vector(fn: Callable, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """fn's floating outputs as one float64 vector (complex as (re, im))."""
    with torch.no_grad():
        outs = flatten(fn(*inputs))
    parts = [
        (torch.view_as_real(o) if o.is_complex() else o).reshape(-1).double()
        for o in outs
        if o.is_floating_point() or o.is_complex()
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _along(fn: Callable, args: Sequence[torch.Tensor], k: int, index: tuple):
    """f(delta): fn's output vector with inputs[k][index] moved by delta, and the
    element's scale (its magnitude, or the input's rms where that is larger)."""
    x = args[k].detach()
    rms = x.double().square().mean().sqrt().item() if x.numel() else 0.0
    scale = max(abs(x[index].item()), rms) or 1.0

    def f(delta: float) -> torch.Tensor:
        inputs = [a.detach().clone() for a in args]
        inputs[k][index] += delta
        return _output_vector(fn, inputs)

    return f, scale


def repeat_differs(fn: Callable, args: Sequence[torch.Tensor]) -> bool:
    """Whether two calls at the same point give different outputs (NaN == NaN):
    the function samples random numbers, or its kernels are nondeterministic."""
    a = _output_vector(fn, [x.detach().clone() for x in args])
    b = _output_vector(fn, [x.detach().clone() for x in args])
    if a.shape != b.shape:
        return True
    return not bool(((a == b) | (a.isnan() & b.isnan())).all())


def measure_kink(
    fn: Callable, args: Sequence[torch.Tensor], k: int, index: tuple
) -> dict[str, Any]:
    """One-sided difference quotients of fn along inputs[k][index], at the steps
    KINK_STEPS (times the element's scale). For a smooth function the gap between
    the forward and the backward quotient, (f(x+h) - 2 f(x) + f(x-h)) / h ~ f'' h,
    shrinks ~10x per decade of h. A kink at distance d keeps it constant (the
    jump of the slope) for every h > d, and a jump of the value makes it grow
    (~J / h). ``kink``: some decade kept at least KINK_KEEPS of its gap, above
    KINK_NOISE float64 roundings of the values. Steps where fn is not finite
    are left out (a domain edge is not a kink)."""
    f, scale = _along(fn, args, k, index)
    f0 = f(0.0)
    eps = torch.finfo(torch.float64).eps
    rows: list[tuple[float, float, float]] = []  # (h, gap, noise)
    for rel in KINK_STEPS:
        h = rel * scale
        fp, fm = f(h), f(-h)
        if fp.shape != f0.shape or fm.shape != f0.shape:
            continue
        if not (fp.isfinite().all() and fm.isfinite().all() and f0.isfinite().all()):
            continue
        gap = ((fp - f0) / h - (f0 - fm) / h).abs().max().item() if f0.numel() else 0
        size = max(f0.abs().max(), fp.abs().max(), fm.abs().max()).item()
        rows.append((h, gap, KINK_NOISE * eps * size / h))
    found = None
    for (h1, g1, _), (h2, g2, n2) in zip(rows, rows[1:], strict=False):
        if g2 > n2 and g2 >= KINK_KEEPS * g1:
            found = (h1, g1, h2, g2)
            break
    return {"kink": found is not None, "where": found, "steps": rows}


def measure_backward_error(
    fn: Callable, args: Sequence[torch.Tensor], k: int, index: tuple, seed: int
) -> dict[str, Any]:
    """Whether the backward is wrong at inputs[k][index], measured without either
    checker: the column of the Jacobian for that element, from the backward
    (one autograd.grad per cotangent: every output element up to
    CONFIRM_MAX_ROWS, else CONFIRM_RANDOM_ROWS seeded Gaussian ones) against float64
    central differences at CONFIRM_STEPS. ``confirmed``: somewhere the backward
    differs from the differences by more than CONFIRM_MARGIN times their spread
    over the steps plus float64 rounding. fn is called with every output it has
    that requires grad (what both checkers compare)."""
    inputs = [a.detach().clone().requires_grad_(True) for a in args]
    with torch.enable_grad():
        outs = [
            o
            for o in flatten(fn(*inputs))
            if (o.is_floating_point() or o.is_complex()) and o.requires_grad
        ]
        if not outs:
            return {"confirmed": False, "why": "no differentiable output"}
        y = torch.cat(
            [(torch.view_as_real(o) if o.is_complex() else o).reshape(-1) for o in outs]
        )
    n = y.numel()
    if n <= CONFIRM_MAX_ROWS:
        cotangents = torch.eye(n, dtype=torch.float64)
    else:
        gen = torch.Generator().manual_seed(seed)
        cotangents = torch.randn(
            CONFIRM_RANDOM_ROWS, n, generator=gen, dtype=torch.float64
        )
    analytical = []
    for v in cotangents:
        (g,) = torch.autograd.grad(
            y, inputs[k], v.to(y.dtype), retain_graph=True, allow_unused=True
        )
        analytical.append(0.0 if g is None else g[index].item())
    analytical = torch.tensor(analytical, dtype=torch.float64)

    positions = _output_positions(fn, args)[0]
    f, scale = _along(_select_outputs(fn, positions), args, k, index)
    f0 = f(0.0)
    if f0.numel() != n:
        return {"confirmed": False, "why": "outputs changed between calls"}
    eps = torch.finfo(torch.float64).eps
    columns = []
    for rel in CONFIRM_STEPS:
        h = rel * scale
        columns.append(cotangents @ ((f(h) - f(-h)) / (2 * h)))
    mid = columns[len(columns) // 2]
    spread = torch.stack([(c - mid).abs() for c in columns]).max(0).values
    rounding = (
        eps
        * f0.abs().max().item()
        * cotangents.abs().sum(1)
        / (min(CONFIRM_STEPS) * scale)
    )
    uncertainty = spread + rounding
    error = (analytical - mid).abs()
    if not (error.isfinite().all() and uncertainty.isfinite().all()):
        return {"confirmed": False, "why": "non-finite differences"}
    j = int((error / uncertainty.clamp_min(1e-300)).argmax())
    return {
        "confirmed": bool(error[j] > CONFIRM_MARGIN * uncertainty[j]),
        "error": error[j].item(),
        "uncertainty": uncertainty[j].item(),
        "numerical": mid[j].item(),
        "analytical": analytical[j].item(),
        "cotangents": "unit" if n <= CONFIRM_MAX_ROWS else "gaussian",
    }


_WIDE = (torch.float64, torch.complex128)


def low_precision_outputs(fn: Callable, args: Sequence[torch.Tensor]) -> list[str]:
    """The dtypes of fn's floating outputs below float64/complex128 (a cast op
    like ``x.half()`` in a float64 sample), measured by one call; [] if none or
    if fn fails."""
    try:
        with torch.no_grad():
            out = fn(*args)
    except Exception:
        return []
    return [
        str(x.dtype).replace("torch.", "")
        for x in flatten(out)
        if (x.is_floating_point() or x.is_complex()) and x.dtype not in _WIDE
    ]


def _low_precision_reason(inputs: Sequence[int], outputs: Sequence[str]) -> str:
    parts = []
    if inputs:
        parts.append(
            ", ".join(f"inputs[{i}]" for i in inputs) + " below float64/complex128"
        )
    if outputs:
        parts.append("outputs in " + ", ".join(sorted(set(outputs))))
    return (
        "; ".join(parts) + " in this sample (measured): torch's checker takes its "
        "numerical Jacobian in that precision with eps=1e-6 (a float16 or bfloat16 "
        "output does not change at all at that step, float32 changes by ~1e-2 "
        "relative), while gradcheck evaluates its reference in float64 (complex128) "
        "and passes"
    )


def diagnose(
    op: Any,
    fn: Callable,
    args: Sequence[torch.Tensor],
    res: SampleResult,
    seed: int,
    budget: float | None,
) -> dict[str, Any]:
    """Follow-up measurements that explain a disagreement, where they can. Each
    is a run of code, never an op's name:

    * ``float32_inputs``: differentiated inputs that are not float64 (OpInfo mixes
      dtypes in a few float64 samples); torch's checker differentiates those in
      their own precision with eps=1e-6, gradcheck uses a float64 reference;
    * ``torch_on_concatenated``: torch's verdict when the differentiable outputs are
      concatenated into one vector. torch computes each output's Jacobian rows
      with the other outputs' gradients undefined; a pass here means its failure
      lives on that undefined-gradient path, which gradcheck (defined, zero-filled
      cotangents on every output) does not take;
    * ``gradcheck_on_differentiable_outputs``: gradcheck's status with only the
      outputs autograd marks differentiable (requires_grad). torch's checker skips
      the others, and so does gradcheck (with a note) when some output requires
      grad; this evidence is for any case where that selection differs;
    * ``below_torch_tolerance``: gradcheck's worst element's error is within
      torch's atol + rtol * |numerical| (1e-5 + 1e-3 |n|): a discrepancy that
      torch's tolerance accepts (full mode only, where it is one element);
    * ``repeat_differs`` (gradcheck failed): two calls at the same point differ
      (:func:`repeat_differs`);
    * ``kink`` (gradcheck said nondifferentiable): one-sided differences at
      gradcheck's worst element (:func:`measure_kink`);
    * ``backward_error`` (gradcheck said mismatch, torch passed): the backward
      against central differences at gradcheck's worst element
      (:func:`measure_backward_error`).
    """
    ev: dict[str, Any] = {}
    t, g = res.torch64, res.gc64
    ev["float32_inputs"] = [
        i for i, a in enumerate(args) if a.dtype not in (torch.float64,)
    ]
    ev["low_precision_outputs"] = low_precision_outputs(fn, args)
    try:
        diff, nondiff = _output_positions(fn, args)
    except Exception as exc:
        ev["outputs_error"] = _first_line(exc, 200)
        return ev
    ev["nondifferentiable_outputs"] = nondiff
    if t.verdict == "failed" and g.verdict == "passed" and len(diff) > 1:
        cat = _concat_outputs(fn, diff)
        ev["torch_on_concatenated"] = run_torch(op, cat, args, budget).verdict
    if g.verdict == "failed" and t.verdict == "passed" and nondiff and diff:
        kept = _select_outputs(fn, diff)
        ev["gradcheck_on_differentiable_outputs"] = run_gradcheck(
            kept, args, seed, budget
        ).status
    if (
        g.verdict == "failed"
        and g.mode == "full"
        and g.error is not None
        and g.numerical is not None
    ):
        ev["below_torch_tolerance"] = g.error <= 1e-5 + 1e-3 * abs(g.numerical)
    if g.verdict != "failed":
        return ev
    try:
        with time_budget(budget):
            ev["repeat_differs"] = repeat_differs(fn, args)
            where = _located_element(g, args)
            ev["element"] = None if where is None else [where[0], list(where[1])]
            if where is not None and g.status == "nondifferentiable":
                ev["kink"] = measure_kink(fn, args, *where)
            if where is not None and g.status == "mismatch" and t.verdict == "passed":
                ev["backward_error"] = measure_backward_error(fn, args, *where, seed)
    except Exception as exc:  # recorded: the disagreement then stays unexplained
        ev["measure_error"] = _first_line(f"{type(exc).__name__}: {exc}", 200)
    return ev


FALSE_ALARM = "gradcheck false alarm"


def explain(res: SampleResult, marks: Sequence[str] = ()) -> tuple[str, str]:
    """(category, explanation) of a disagreement, from the measurements in
    ``res.evidence`` (see :func:`diagnose`); never from an op's name.

    Categories, first match wins:

    * "sampling": two calls at the same point differ (``repeat_differs``);
    * "kink": gradcheck said "nondifferentiable" and one-sided differences at its
      element show the kink or jump (``kink``); torch's +-1e-6 central
      differences missed it;
    * "float32 input": torch failed on a sample whose differentiated inputs include
      a non-float64 tensor, which its checker cannot judge; gradcheck passed;
    * "low-precision output": torch failed, gradcheck passed, and the function's
      output is below float64 (a cast op: measured by calling it);
    * "undefined-grad path": torch failed, gradcheck passed, and torch passes once
      the outputs are concatenated;
    * "non-differentiable output": gradcheck failed, torch passed, and gradcheck
      passes on the outputs autograd marks differentiable;
    * "torch-only check": torch failed a check that is not about gradient values
      (undefined output grads, reentrancy, grad dtype/size);
    * "PyTorch bug (gradcheck right)": gradcheck said mismatch, torch passed, and
      central differences at gradcheck's element confirm the backward is wrong
      (``backward_error``): torch's looser tolerance or its fast mode let it by;
    * "gradcheck false alarm": gradcheck said mismatch, torch passed, and no
      measurement above explains it: every one fails tests/test_opinfo.py;
    * "real difference -- investigate": none of the above.

    PyTorch's own test marks (skip/xfail of test_fn_grad) and NOTES are quoted in
    the text, never used to classify.
    """
    t, g, ev = res.torch64, res.gc64, res.evidence
    suite = f" (PyTorch's test_fn_grad: {'; '.join(marks)})" if marks else ""
    note = f" Note: {NOTES[res.op]}" if res.op in NOTES else ""
    if ev.get("repeat_differs"):
        return (
            "sampling",
            "sampling/random op: two calls at the same point gave different "
            f"outputs (gradcheck: {g.status}){suite}",
        )
    kink = ev.get("kink") or {}
    if g.status == "nondifferentiable" and kink.get("kink"):
        h1, g1, h2, g2 = kink["where"]
        k, index = ev["element"]
        reason = piecewise_reason(res.op)
        return (
            "kink",
            f"measured at inputs[{k}]{index}: the one-sided difference quotients "
            f"differ by {g2:.3g} at step {h2:.1e} and by {g1:.3g} at {h1:.1e} (a "
            "smooth function's gap shrinks ~10x per decade): a kink or jump that "
            "torch's +-1e-6 central differences miss (a step too small to reach it, "
            "or a jump the same on both sides, which cancels in a central "
            "difference)" + (f"; the op: {reason}" if reason else ""),
        )
    if t.verdict == "failed" and g.verdict == "passed" and ev.get("float32_inputs"):
        which = ", ".join(f"inputs[{i}]" for i in ev["float32_inputs"])
        return (
            "float32 input",
            f"{which} is float32 in this float64 sample: torch differentiates it in "
            "float32 with eps=1e-6 (its numerical Jacobian is off by ~1e-2); "
            f"gradcheck uses a float64 reference and passes{suite}",
        )
    if (
        t.verdict == "failed"
        and g.verdict == "passed"
        and ev.get("low_precision_outputs")
    ):
        return (
            "low-precision output",
            _low_precision_reason([], ev["low_precision_outputs"]) + suite,
        )
    if t.verdict == "failed" and ev.get("torch_on_concatenated") == "passed":
        return (
            "undefined-grad path",
            "torch passes once the outputs are concatenated: it computes each "
            "output's rows with the other outputs' gradients undefined, and the "
            "op's backward mishandles that; gradcheck gives every output a defined "
            f"cotangent and checks the other path, which is right{suite}",
        )
    if (
        g.verdict == "failed"
        and ev.get("gradcheck_on_differentiable_outputs") == "passed"
    ):
        return (
            "non-differentiable output",
            f"outputs {ev['nondifferentiable_outputs']} (flattened) do not require "
            "grad (autograd marks them non-differentiable); torch's checker skips "
            "them, and gradcheck passes once only the others are returned",
        )
    if t.verdict == "failed" and t.status not in ("jacobian", "other"):
        return (
            "torch-only check",
            f"torch failed a check gradcheck does not make ({t.status}): "
            + _first_line(t.message, 160),
        )
    tol = ""
    if ev.get("below_torch_tolerance"):
        tol = (
            f"gradcheck's error {g.error:.2e} at |J| {abs(g.numerical):.3g} is within "
            "torch's atol=1e-5 + rtol=1e-3 tolerance. "
        )
    wrong = ev.get("backward_error") or {}
    if g.status == "mismatch" and t.verdict == "passed":
        if wrong.get("confirmed"):
            k, index = ev["element"]
            return (
                "PyTorch bug (gradcheck right)",
                f"{tol}measured at inputs[{k}]{index}: the backward gives "
                f"{wrong['analytical']:.10g}, central differences at steps "
                f"{', '.join(f'{h:g}' for h in CONFIRM_STEPS)} x scale give "
                f"{wrong['numerical']:.10g}, off by {wrong['error']:.2e} while they "
                f"agree among themselves to {wrong['uncertainty']:.1e} "
                f"({CONFIRM_MARGIN:g}x needed).{note}",
            )
        why = (
            wrong.get("why")
            or ev.get("measure_error")
            or (
                "no element to measure at"
                if ev.get("element") is None
                else f"central differences agree with the backward (error "
                f"{wrong.get('error', math.nan):.2e}, uncertainty "
                f"{wrong.get('uncertainty', math.nan):.1e})"
            )
        )
        return FALSE_ALARM, f"{tol}not confirmed by measurement: {why}{note}"
    why = ev.get("measure_error", "")
    if g.status == "nondifferentiable" and not kink.get("kink"):
        why = why or "no kink found by one-sided differences at gradcheck's element"
    return "real difference -- investigate", " ".join(
        x
        for x in (
            tol.strip(),
            why,
            f"PyTorch's test_fn_grad: {'; '.join(marks)}" if marks else "",
        )
        if x
    )


def explain_float32(res: SampleResult) -> str:
    """Explanation of a float32 failure (INVESTIGATED_FLOAT32, or the automatic
    evidence: float64 failed too, or no float64 reference could be used)."""
    g32 = res.gc32
    if res.gc64.verdict != "passed":
        return f"float64 did not pass either ({_verdict(res.gc64)})"
    text = INVESTIGATED_FLOAT32.get(res.op, "")
    if not text and any("runs in float32, not float64" in n for n in g32.notes):
        text = "no float64 reference: fn could not run on float64 copies"
    return text or "unexplained -- investigate"


def classify(res: SampleResult, marks: Sequence[str] = ()) -> SampleResult:
    res.comparison = compare(res.torch64, res.gc64)
    if res.comparison == "disagree":
        res.category, res.explanation = explain(res, marks)
    if res.gc32.verdict not in ("passed", "skipped"):
        res.float32_explanation = explain_float32(res)
    return res


# ---------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------
#: The comparisons beyond float64 gradients (see the module docstring).
EXTRA_KINDS = ("complex", "order2", "forward")
ALL_CHECKS = ("float64", *EXTRA_KINDS)


@dataclass
class ExtraResult:
    """One sample of a complex / second-order / forward-mode comparison."""

    kind: str
    op: str
    index: int
    sample: str
    torch: Outcome
    gc: Outcome
    comparison: str = ""
    #: what measurement explains a disagreement (see explain_extra)
    category: str = ""
    explanation: str = ""


@dataclass
class OpResult:
    op: str
    n_samples: int = 0
    results: list[SampleResult] = field(default_factory=list)
    #: complex, order-2 and forward-mode comparisons (EXTRA_KINDS)
    extra: list[ExtraResult] = field(default_factory=list)
    #: Why the op produced no results, if it did not ("sample generation failed").
    error: str = ""
    #: Samples with no tensor requiring grad (nothing for either checker to do).
    no_grad_samples: int = 0
    float32_backward: bool = True
    marks: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_op(
    op: Any,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    budget: float | None = DEFAULT_BUDGET_S,
    float32: bool = True,
    checks: Sequence[str] = ALL_CHECKS,
) -> OpResult:
    """Both checkers on up to ``max_samples`` float64 samples of one op, then
    gradcheck on the same samples in float32; disagreements are diagnosed. Then
    the ``checks`` beyond float64 (EXTRA_KINDS) on the op's samples."""
    t_op = time.perf_counter()
    out = OpResult(op_id(op), marks=torch_test_marks(op))
    out.float32_backward = torch.float32 in op.supported_backward_dtypes("cpu")
    try:
        out.n_samples, chosen = samples_for(op, max_samples, seed)
    except Exception as exc:
        out.error = _first_line(f"sample generation: {type(exc).__name__}: {exc}")
        return out
    if "float64" not in checks:
        chosen = []
    for index, sample in chosen:
        args = grad_args(sample)
        if not args:
            out.no_grad_samples += 1
            continue
        fn = make_fn(op, sample)
        res = SampleResult(
            out.op,
            index,
            describe(sample),
            torch64=run_torch(op, fn, args, budget, n_out=output_numel(fn, args)),
            gc64=run_gradcheck(fn, args, seed, budget),
            gc32=Outcome("skipped", "no float32 backward"),
        )
        if float32 and out.float32_backward:
            s32 = to_float32(sample)
            res.gc32 = run_gradcheck(make_fn(op, s32), grad_args(s32), seed, budget)
        if compare(res.torch64, res.gc64) == "disagree":
            res.evidence = diagnose(op, fn, args, res, seed, budget)
        out.results.append(classify(res, out.marks))
    out.extra = run_extra(op, checks, max_samples=max_samples, seed=seed, budget=budget)
    out.seconds = time.perf_counter() - t_op
    return out


def run_extra(
    op: Any,
    checks: Sequence[str],
    *,
    max_samples: int,
    seed: int,
    budget: float | None,
) -> list[ExtraResult]:
    """The complex, order-2 and forward-mode comparisons on one op (the kinds in
    ``checks`` the op supports: complex128 backward, supports_gradgrad,
    supports_forward_ad)."""
    wanted: list[tuple[str, torch.dtype]] = []
    if "complex" in checks and torch.complex128 in op.supported_backward_dtypes("cpu"):
        wanted.append(("complex", torch.complex128))
    if "order2" in checks and op.supports_gradgrad:
        wanted.append(("order2", torch.float64))
    if "forward" in checks and op.supports_forward_ad:
        wanted.append(("forward", torch.float64))
    found: list[ExtraResult] = []
    for kind, dtype in wanted:
        try:
            _, chosen = samples_for(op, max_samples, seed, dtype)
        except Exception as exc:
            found.append(
                ExtraResult(
                    kind,
                    op_id(op),
                    -1,
                    "sample generation",
                    Outcome("refused", type(exc).__name__, _first_line(exc)),
                    Outcome("skipped", "skipped"),
                    "not compared",
                )
            )
            continue
        gc_kwargs = {"order": 2} if kind == "order2" else {}
        if kind == "forward":
            gc_kwargs = {"ad": "forward"}
        for index, sample in chosen:
            args = grad_args(sample)
            if not args:
                continue
            fn = make_fn(op, sample)
            res = ExtraResult(
                kind,
                op_id(op),
                index,
                describe(sample),
                torch=run_torch(
                    op, fn, args, budget, n_out=output_numel(fn, args), kind=kind
                ),
                gc=run_gradcheck(fn, args, seed, budget, **gc_kwargs),
            )
            res.comparison = compare(res.torch, res.gc)
            if res.comparison == "disagree":
                res.category, res.explanation = explain_extra(op, fn, args, res)
                _with_note(res)
            found.append(res)
    return found


def explain_extra(
    op: Any, fn: Callable, args: Sequence[torch.Tensor], res: ExtraResult
) -> tuple[str, str]:
    """(category, explanation) of a disagreement in a complex / order-2 /
    forward comparison, from what the two checkers reported and what a
    measurement finds; never from an op's name.

    * "torch-only check": torch failed on something that is not a derivative's
      value (undefined gradients, dtype/size metadata, reentrancy);
    * "below torch's tolerance": gradcheck's worst element differs by less than
      torch's atol + rtol |numerical|, so torch's looser tolerance passes it;
    * "low-precision tensor": torch failed, gradcheck passed, and a
      differentiated input or an output is below float64/complex128 (measured);
    * FORWARD_OFF: a forward-mode mismatch torch passes, where gradcheck's
      reverse-mode check of the same sample passes (measured): forward mode
      differs from reverse mode and finite differences;
    * "kink": gradcheck said "nondifferentiable";
    * "gradcheck refused as torch does": (not a disagreement: listed apart);
    * otherwise "real difference -- investigate"."""
    t, g = res.torch, res.gc
    if t.verdict == "failed" and g.verdict == "passed":
        low_in = [i for i, a in enumerate(args) if a.dtype not in _WIDE]
        low_out = low_precision_outputs(fn, args)
        if low_in or low_out:
            return "low-precision tensor", _low_precision_reason(low_in, low_out)
    if t.verdict == "failed" and t.status in (
        "undefined-grad",
        "grad-metadata",
        "reentrant",
        "not-multiplied",
    ):
        return "torch-only check", f"torch failed a {t.status} check, not a value"
    if res.kind == "forward" and g.status == "mismatch" and t.verdict == "passed":
        # measured: does reverse mode agree with finite differences here?
        rev = run_gradcheck(fn, args, 0, DEFAULT_BUDGET_S)
        if rev.verdict == "passed":
            return FORWARD_OFF, (
                "gradcheck's reverse-mode check of the same sample passes, so the "
                "forward-mode derivative differs from both reverse mode and finite "
                f"differences (gradcheck's worst element: numerical "
                f"{g.numerical:.6g}, forward {g.analytical:.6g}); torch's "
                "check_forward_ad passes it within atol=1e-5 + rtol=1e-3"
            )
    if (
        g.verdict == "failed"
        and g.error is not None
        and g.numerical is not None
        and g.mode == "full"
        and g.error <= 1e-5 + 1e-3 * abs(g.numerical)
    ):
        return "below torch's tolerance", (
            f"gradcheck's worst element is off by {g.error:.2e} at |numerical| "
            f"{abs(g.numerical):.3g}: within torch's atol=1e-5 + rtol=1e-3"
        )
    if g.verdict == "failed" and g.status == "nondifferentiable":
        return "kink", "gradcheck found one-sided derivatives that differ"
    return UNEXPLAINED, ""


#: a forward-mode derivative that differs from reverse mode, which matches finite
#: differences (see explain_extra)
FORWARD_OFF = "PyTorch forward AD off (reverse right)"


def _with_note(res: ExtraResult) -> None:
    note = EXTRA_NOTES.get((res.kind, res.op))
    if note and res.comparison == "disagree":
        res.explanation = (res.explanation + "; " if res.explanation else "") + note
        if res.category == UNEXPLAINED and note.startswith("a gradcheck false alarm"):
            res.category = FALSE_ALARM


def limit_memory(gb: float) -> None:
    """Cap this process's address space at ``gb`` GiB (RLIMIT_AS; 0 = no cap).
    The sweep shares its machine: one op allocating 24 GB (torch's slow mode on
    grid_sampler_3d did, before torch_slow_mode_too_big) must fail alone."""
    if not gb:
        return
    try:
        import resource
    except ImportError:  # not POSIX
        return
    limit = int(gb * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_init(memory_gb: float) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    limit_memory(memory_gb)


_DB_BY_ID: dict[str, Any] = {}


def _run_op_by_id(oid: str, kwargs: dict) -> OpResult:
    if not _DB_BY_ID:
        _DB_BY_ID.update((op_id(op), op) for op in op_db())
    return run_op(_DB_BY_ID[oid], **kwargs)


def sweep(
    ops: Sequence[Any],
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    budget: float | None = DEFAULT_BUDGET_S,
    float32: bool = True,
    workers: int = 1,
    memory_gb: float = 0.0,
    progress: Callable[[OpResult], None] | None = None,
    checks: Sequence[str] = ALL_CHECKS,
) -> list[OpResult]:
    """run_op over ``ops``, in this process (workers=1) or in a spawn pool, one op
    per task; results in the order of ``ops``. torch runs single-threaded either
    way, so both checkers are timed alike. ``memory_gb`` caps each worker's
    address space (limit_memory); in-process, the caller sets its own cap."""
    kwargs = dict(
        max_samples=max_samples,
        seed=seed,
        budget=budget,
        float32=float32,
        checks=tuple(checks),
    )
    results: dict[str, OpResult] = {}
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore")
                for op in ops:
                    r = run_op(op, **kwargs)
                    results[r.op] = r
                    if progress:
                        progress(r)
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ids = [op_id(op) for op in ops]
        ids.sort(key=lambda oid: oid not in SLOW_OPS)  # stable: slow ones first
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, ctx, initializer=_worker_init, initargs=(memory_gb,)
        ) as pool:
            futures = [pool.submit(_run_op_by_id, oid, kwargs) for oid in ids]
            for fut in as_completed(futures):
                r = fut.result()
                results[r.op] = r
                if progress:
                    progress(r)
    return [results[op_id(op)] for op in ops]


# ---------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------
UNEXPLAINED = "real difference -- investigate"


def summarize(selection: Selection, op_results: Sequence[OpResult]) -> dict:
    """Counts, agreement, float32 results and timing, as one JSON-able dict."""
    samples = [r for o in op_results for r in o.results]
    comp = Counter(r.comparison for r in samples)
    compared = comp["agree"] + comp["disagree"]
    pairs = Counter((r.torch64.verdict, r.gc64.verdict) for r in samples)
    gc_status = Counter(r.gc64.status for r in samples if r.gc64.verdict == "failed")
    categories = Counter(r.category for r in samples if r.comparison == "disagree")
    crashes = Counter(
        r.gc64.message.split(":")[0] + ": " + r.gc64.message.split(": ", 1)[-1][:80]
        for r in samples
        if r.gc64.verdict == "crash"
    )

    f32 = [r for r in samples if r.gc32.verdict != "skipped"]
    f32_after_pass = [r for r in f32 if r.gc64.verdict == "passed"]
    f32_status = Counter(
        r.gc32.status if r.gc32.verdict in ("passed", "failed") else r.gc32.verdict
        for r in f32_after_pass
    )
    f32_mismatch = [r for r in f32_after_pass if r.gc32.status == "mismatch"]

    timed = [
        r
        for r in samples
        if r.torch64.verdict in ("passed", "failed")
        and r.gc64.verdict in ("passed", "failed")
    ]
    t_torch = sum(r.torch64.seconds for r in timed)
    t_gc = sum(r.gc64.seconds for r in timed)
    ratios = [r.gc64.seconds / r.torch64.seconds for r in timed if r.torch64.seconds]
    deciles = statistics.quantiles(ratios, n=10) if len(ratios) >= 2 else []
    extra = [e for o in op_results for e in o.extra]
    kinds = {}
    for kind in EXTRA_KINDS:
        rows = [e for e in extra if e.kind == kind]
        c = Counter(e.comparison for e in rows)
        n = c["agree"] + c["disagree"]
        cats = Counter(e.category for e in rows if e.comparison == "disagree")
        kinds[kind] = {
            "samples": len(rows),
            "compared": n,
            "agree": c["agree"],
            "disagree": c["disagree"],
            "agreement": c["agree"] / n if n else math.nan,
            "not_compared": c["not compared"],
            "unexplained": cats[UNEXPLAINED],
            "categories": dict(cats),
            "verdict_pairs": {
                f"torch {a} / gradcheck {b}": k
                for (a, b), k in Counter(
                    (e.torch.verdict, e.gc.verdict) for e in rows
                ).items()
            },
            "seconds_torch": sum(e.torch.seconds for e in rows),
            "seconds_gradcheck": sum(e.gc.seconds for e in rows),
        }
    all_agree = comp["agree"] + sum(k["agree"] for k in kinds.values())
    all_compared = compared + sum(k["compared"] for k in kinds.values())
    return {
        "extra": kinds,
        "all_agree": all_agree,
        "all_compared": all_compared,
        "all_agreement": all_agree / all_compared if all_compared else math.nan,
        "all_unexplained": categories[UNEXPLAINED]
        + categories[FALSE_ALARM]
        + sum(k["unexplained"] for k in kinds.values()),
        "ops_in_op_db_selection": selection.total,
        "ops_not_differentiable": len(selection.not_differentiable),
        "ops_no_float64_backward": len(selection.no_float64_backward),
        "ops_skipped": selection.skipped,
        "ops_run": len(op_results),
        "ops_sample_generation_failed": {o.op: o.error for o in op_results if o.error},
        "samples_available": sum(o.n_samples for o in op_results),
        "samples_run": len(samples),
        "samples_without_grad_inputs": sum(o.no_grad_samples for o in op_results),
        "torch_fast_mode_fallbacks": sum(
            FAST_FALLBACK in r.torch64.notes for r in samples
        ),
        "torch_fast_mode_by_opinfo": sum(
            any("(OpInfo)" in n for n in r.torch64.notes) for r in samples
        ),
        "compared": compared,
        "agree": comp["agree"],
        "disagree": comp["disagree"],
        "agreement": comp["agree"] / compared if compared else math.nan,
        "disagreements_explained": comp["disagree"]
        - categories[UNEXPLAINED]
        - categories[FALSE_ALARM],
        "disagreement_categories": dict(categories),
        "gradcheck_false_alarms_float64": categories[FALSE_ALARM],
        "verdict_pairs": {
            f"torch {a} / gradcheck {b}": n for (a, b), n in pairs.items()
        },
        "gradcheck_failing_statuses": dict(gc_status),
        "not_compared": comp["not compared"],
        "gradcheck_crashes": dict(crashes),
        "float32_run": len(f32),
        "float32_where_float64_passed": len(f32_after_pass),
        "float32_statuses_where_float64_passed": dict(f32_status),
        "float32_mismatches_where_float64_passed": len(f32_mismatch),
        "seconds_torch_float64": t_torch,
        "seconds_gradcheck_float64": t_gc,
        "seconds_gradcheck_float32": sum(r.gc32.seconds for r in f32),
        "seconds_ops_total": sum(o.seconds for o in op_results),
        "timed_samples": len(timed),
        "ratio_total_gradcheck_over_torch": t_gc / t_torch if t_torch else math.nan,
        "ratio_median_gradcheck_over_torch": statistics.median(ratios)
        if ratios
        else math.nan,
        "ratio_p10_gradcheck_over_torch": deciles[0] if deciles else math.nan,
        "ratio_p90_gradcheck_over_torch": deciles[-1] if deciles else math.nan,
        "gradcheck_faster_share": sum(x < 1 for x in ratios) / len(ratios)
        if ratios
        else math.nan,
    }


def _cell(text: Any, n: int = CELL_CHARS) -> str:
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= n else s[: n - 3] + "..."


def _verdict(o: Outcome) -> str:
    if o.verdict in ("passed", "skipped"):
        return o.verdict
    return f"{o.verdict} ({o.status})" if o.status != o.verdict else o.verdict


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counter.items())) or "none"


def write_markdown(
    path: Path,
    summary: dict,
    op_results: Sequence[OpResult],
    *,
    command: str,
    wall_seconds: float,
    settings: dict,
) -> None:
    """The report: header (what was run, counts, agreement, float32, timing), then
    the disagreement table, the float32 failures table and the samples one tool
    gave no verdict on (grouped)."""
    s = summary
    samples = [r for o in op_results for r in o.results]
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    unexplained = s["disagree"] - s["disagreements_explained"]
    lines = [
        "# OpInfo sweep: gradcheck vs torch.autograd.gradcheck",
        "",
        "Generated by `benchmarks/opinfo_sweep.py` (its docstring says how); do not "
        "edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Date: {now}; torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()} CPU; {settings['workers']} "
        "worker process(es), 1 torch thread each.",
        f"- Settings: up to {settings['max_samples']} float64 samples per op (spread "
        f"evenly over the op's sample list, first and last included), seed "
        f"{settings['seed']}, {settings['budget']:g} s budget per tool call. "
        "torch.autograd.gradcheck: its defaults (slow mode, atol=1e-5, rtol=1e-3) "
        "plus the OpInfo's gradcheck_nondet_tol / gradcheck_fast_mode; fast mode "
        f"where slow mode is out of reach ({s['torch_fast_mode_fallbacks']} samples) "
        f"or the OpInfo asks for it ({s['torch_fast_mode_by_opinfo']}). "
        "gradcheck.check_gradients: its defaults. The function is test_fn_grad's "
        "(op.gradcheck_wrapper, sample.output_process_fn_grad).",
        f"- Ops: {s['ops_in_op_db_selection']} in op_db; run {s['ops_run']}; not "
        f"differentiable {s['ops_not_differentiable']}; no float64 backward on CPU "
        f"{s['ops_no_float64_backward']}; skipped {len(s['ops_skipped'])}; sample "
        f"generation failed {len(s['ops_sample_generation_failed'])}.",
        f"- Samples: {s['samples_run']} run, of the {s['samples_available']} float64 "
        f"samples these ops have; {s['samples_without_grad_inputs']} chosen samples "
        "had no tensor requiring grad and were not run.",
        *(
            f"- Merged re-run of {m['ops']} ops (checks "
            f"{', '.join(m['checks'] or [])}), whose results replace the run above "
            f"for those ops: `{m['command']}`"
            for m in settings.get("merged") or ()
        ),
        "",
        "## Float64: verdicts",
        "",
        f"**Agreement: {s['agree']} / {s['compared']} = {100 * s['agreement']:.2f}%** "
        f"of the samples both tools gave a verdict on. {s['disagree']} "
        f"disagreements: {s['disagreements_explained']} explained, {unexplained} "
        f"unexplained; {s['gradcheck_false_alarms_float64']} of them are gradcheck "
        f"false alarms. {s['not_compared']} samples not compared (a tool gave no "
        "verdict; see the last table).",
        "",
        "| torch / gradcheck | samples |",
        "|---|---|",
    ]
    lines += [f"| {k} | {n} |" for k, n in sorted(s["verdict_pairs"].items())]
    lines += _extra_markdown(s, op_results)
    lines += [
        "",
        f"gradcheck's failing statuses: {_counts(s['gradcheck_failing_statuses'])}.",
        "",
        f"Disagreement categories: {_counts(s['disagreement_categories'])}.",
        "",
        "gradcheck crashes (exceptions from gradcheck's own code): "
        + (
            "; ".join(f"{n} x `{k}`" for k, n in sorted(s["gradcheck_crashes"].items()))
            or "none"
        )
        + ".",
        "",
        "## Float32 (gradcheck only: torch's checker cannot judge float32)",
        "",
        f"{s['float32_run']} samples run in float32 (every float64 tensor of the "
        f"sample cast); {s['float32_where_float64_passed']} of them passed "
        "gradcheck in float64. Their float32 statuses: "
        f"{_counts(s['float32_statuses_where_float64_passed'])}.",
        "",
        f"**Float32 mismatches where float64 passed: "
        f"{s['float32_mismatches_where_float64_passed']}** (listed, with the other "
        "float32 failures, below).",
        "",
        "## Timing",
        "",
        f"- Sweep wall time: {wall_seconds:.0f} s; time in ops, summed over workers: "
        f"{s['seconds_ops_total']:.0f} s (sample generation, both checkers in "
        "float64, gradcheck in float32, diagnosis of disagreements).",
        f"- Float64, the {s['timed_samples']} samples both tools judged: "
        f"torch.autograd.gradcheck {s['seconds_torch_float64']:.1f} s, gradcheck "
        f"{s['seconds_gradcheck_float64']:.1f} s.",
        f"- gradcheck / torch time: total {s['ratio_total_gradcheck_over_torch']:.2f}; "
        f"per sample: median {s['ratio_median_gradcheck_over_torch']:.2f}, 10th "
        f"percentile {s['ratio_p10_gradcheck_over_torch']:.2f}, 90th percentile "
        f"{s['ratio_p90_gradcheck_over_torch']:.2f}; gradcheck faster on "
        f"{100 * s['gradcheck_faster_share']:.0f}% of samples.",
        f"- gradcheck in float32: {s['seconds_gradcheck_float32']:.1f} s.",
        "",
        "## Disagreements (float64)",
        "",
    ]
    dis = [r for r in samples if r.comparison == "disagree"]
    if dis:
        lines += [
            "| op | sample | torch | gradcheck | category | explanation |",
            "|---|---|---|---|---|---|",
        ]
        for r in dis:
            detail = r.explanation
            if r.gc64.verdict == "failed":
                detail += " -- gradcheck: " + r.gc64.message
            elif r.torch64.verdict == "failed" and r.category != "torch-only check":
                detail += " -- torch: " + r.torch64.message
            lines.append(
                f"| {r.op} | #{r.index} {_cell(r.sample, 90)} | {_verdict(r.torch64)} "
                f"| {_verdict(r.gc64)} | {r.category} | {_cell(detail, 520)} |"
            )
    else:
        lines.append("None.")
    lines += ["", "## Float32 failures", "", "### Where float64 passed", ""]
    f32_fail = [r for r in samples if r.gc32.verdict not in ("passed", "skipped")]
    after_pass = [r for r in f32_fail if r.gc64.verdict == "passed"]
    if after_pass:
        lines += [
            "| op | sample | float64 torch / gradcheck | float32 gradcheck "
            "| explanation | message |",
            "|---|---|---|---|---|---|",
        ]
        for r in after_pass:
            lines.append(
                f"| {r.op} | #{r.index} {_cell(r.sample, 90)} | {_verdict(r.torch64)} "
                f"/ {_verdict(r.gc64)} | {_verdict(r.gc32)} | "
                f"{_cell(r.float32_explanation, 400)} | {_cell(r.gc32.message)} |"
            )
    else:
        lines.append("None.")
    rest: dict[tuple[str, str], list[str]] = {}
    for r in f32_fail:
        if r.gc64.verdict != "passed":
            key = (_verdict(r.gc64), _verdict(r.gc32))
            rest.setdefault(key, []).append(f"{r.op} #{r.index}")
    lines += ["", "### Where float64 did not pass either", ""]
    if rest:
        lines += ["| float64 gradcheck | float32 gradcheck | samples | ops |"]
        lines += ["|---|---|---|---|"]
        for (v64, v32), where in sorted(rest.items(), key=lambda kv: -len(kv[1])):
            lines.append(
                f"| {v64} | {v32} | {len(where)} | {_cell(', '.join(where), 700)} |"
            )
    else:
        lines.append("None.")
    lines += [
        "",
        "## Not compared (float64): a tool gave no verdict",
        "",
        "Grouped by the two outcomes and the message; ops listed with sample indices.",
        "",
    ]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in samples:
        if r.comparison != "not compared":
            continue
        who = r.gc64 if r.gc64.verdict not in ("passed", "failed") else r.torch64
        key = (_verdict(r.torch64), _verdict(r.gc64), _cell(who.message, 160))
        groups.setdefault(key, []).append(f"{r.op} #{r.index}")
    if groups:
        lines += [
            "| torch | gradcheck | samples | message | ops |",
            "|---|---|---|---|---|",
        ]
        for (tv, gv, msg), where in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(
                f"| {tv} | {gv} | {len(where)} | {msg} | {_cell(', '.join(where), 700)} |"
            )
    else:
        lines.append("None.")
    failed_gen = s["ops_sample_generation_failed"]
    if failed_gen or s["ops_skipped"]:
        lines += ["", "## Ops not run", ""]
        lines += [f"- {k}: skipped ({v})" for k, v in s["ops_skipped"].items()]
        lines += [f"- {k}: {_cell(v)}" for k, v in failed_gen.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


_KIND_TITLES = {
    "complex": "complex128 samples: torch.autograd.gradcheck vs check_gradients",
    "order2": "second order (supports_gradgrad): torch.autograd.gradgradcheck vs "
    "check_gradients(order=2)",
    "forward": "forward mode (supports_forward_ad): torch.autograd.gradcheck("
    "check_forward_ad=True, check_backward_ad=False) vs "
    "check_gradients(ad='forward')",
}


def _extra_markdown(s: dict, op_results: Sequence[OpResult]) -> list[str]:
    """The complex / order-2 / forward-mode sections and the overall agreement."""
    extra = [e for o in op_results for e in o.extra]
    if not extra:
        return []
    lines = [
        "",
        "## Complex, second order and forward mode",
        "",
        f"**Agreement over everything (float64 gradients and the three kinds "
        f"below): {s['all_agree']} / {s['all_compared']} = "
        f"{100 * s['all_agreement']:.2f}%**; unexplained disagreements: "
        f"{s['all_unexplained']}.",
    ]
    for kind in EXTRA_KINDS:
        k = s["extra"][kind]
        if not k["samples"]:
            continue
        lines += [
            "",
            f"### {_KIND_TITLES[kind]}",
            "",
            f"Agreement: {k['agree']} / {k['compared']} = {100 * k['agreement']:.2f}%;"
            f" {k['disagree']} disagreements ({_counts(k['categories'])}); "
            f"{k['not_compared']} not compared. torch {k['seconds_torch']:.1f} s, "
            f"gradcheck {k['seconds_gradcheck']:.1f} s.",
            "",
            "| torch / gradcheck | samples |",
            "|---|---|",
        ]
        lines += [f"| {p} | {n} |" for p, n in sorted(k["verdict_pairs"].items())]
    dis = [e for e in extra if e.comparison == "disagree"]
    lines += ["", "### Disagreements (complex, order 2, forward)", ""]
    if dis:
        lines += [
            "| kind | op | sample | torch | gradcheck | category | details |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in dis:
            detail = e.explanation
            if e.gc.verdict == "failed":
                detail += " -- gradcheck: " + e.gc.message
            if e.torch.verdict == "failed":
                detail += " -- torch: " + e.torch.message
            lines.append(
                f"| {e.kind} | {e.op} | #{e.index} {_cell(e.sample, 80)} | "
                f"{_verdict(e.torch)} | {_verdict(e.gc)} | {e.category} | "
                f"{_cell(detail, 600)} |"
            )
    else:
        lines.append("None.")
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for e in extra:
        if e.comparison != "not compared":
            continue
        who = e.gc if e.gc.verdict not in ("passed", "failed", "skipped") else e.torch
        key = (e.kind, _verdict(e.torch), _verdict(e.gc), _cell(who.message, 160))
        groups.setdefault(key, []).append(f"{e.op} #{e.index}")
    lines += ["", "### Not compared (complex, order 2, forward)", ""]
    if groups:
        lines += [
            "| kind | torch | gradcheck | samples | message | ops |",
            "|---|---|---|---|---|---|",
        ]
        for (kd, tv, gv, msg), where in sorted(
            groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))
        ):
            lines.append(
                f"| {kd} | {tv} | {gv} | {len(where)} | {msg} | "
                f"{_cell(', '.join(where), 500)} |"
            )
    else:
        lines.append("None.")
    return lines


def to_json(summary: dict, op_results: Iterable[OpResult], settings: dict) -> dict:
    return {
        "settings": settings,
        "torch": torch.__version__,
        "summary": summary,
        "ops": [asdict(o) for o in op_results],
    }


def merge_runs(base: dict, reruns: Sequence[dict]) -> dict:
    """``base`` with each re-run's ops replacing its own: the float64 results
    where the re-run ran float64, the complex/order-2/forward results of the
    kinds it ran. The merged settings list the re-runs."""
    ops = {o["op"]: o for o in base["ops"]}
    for rerun in reruns:
        checks = set(rerun["settings"].get("checks") or ALL_CHECKS)
        for o in rerun["ops"]:
            mine = ops.get(o["op"])
            if mine is None:
                continue
            if "float64" in checks:
                mine["results"] = o["results"]
                mine["no_grad_samples"] = o["no_grad_samples"]
            kinds = checks & set(EXTRA_KINDS)
            mine["extra"] = [
                e for e in mine.get("extra", []) if e["kind"] not in kinds
            ] + [e for e in o.get("extra", []) if e["kind"] in kinds]
    merged = dict(base)
    merged["settings"] = dict(
        base["settings"],
        merged=[
            {
                "command": r.get("command", ""),
                "checks": r["settings"].get("checks"),
                "ops": len(r["ops"]),
            }
            for r in reruns
        ],
    )
    return merged


def from_json(doc: dict) -> tuple[Selection, list[OpResult]]:
    """A saved run (``--json``) as the sweep's objects, with the current
    EXTRA_NOTES applied: the report can be rewritten without rerunning."""

    def outcome(d: dict) -> Outcome:
        return Outcome(**d)

    ops = []
    for o in doc["ops"]:
        results = [
            SampleResult(
                **{
                    **r,
                    "torch64": outcome(r["torch64"]),
                    "gc64": outcome(r["gc64"]),
                    "gc32": outcome(r["gc32"]),
                }
            )
            for r in o["results"]
        ]
        extra = [
            ExtraResult(**{**e, "torch": outcome(e["torch"]), "gc": outcome(e["gc"])})
            for e in o.get("extra", [])
        ]
        for e in extra:
            _with_note(e)
        ops.append(OpResult(**{**o, "results": results, "extra": extra}))
    s = doc["summary"]
    selection = Selection(
        ops=[],
        not_differentiable=[""] * s["ops_not_differentiable"],
        no_float64_backward=[""] * s["ops_no_float64_backward"],
        skipped=dict(s["ops_skipped"]),
        total=s["ops_in_op_db_selection"],
    )
    return selection, ops


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--ops",
        nargs="*",
        default=None,
        help="op ids to run (comma or space separated); substrings unless --exact",
    )
    p.add_argument("--exact", action="store_true", help="--ops are whole op ids")
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="run only the first N ops")
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds per tool call",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--memory-gb",
        type=float,
        default=DEFAULT_MEMORY_GB,
        help="address-space cap per process, GiB (0: none)",
    )
    p.add_argument("--no-float32", action="store_true")
    p.add_argument(
        "--checks",
        default=",".join(ALL_CHECKS),
        help="comparisons to run, comma separated, from "
        f"{', '.join(ALL_CHECKS)} (default: all)",
    )
    p.add_argument("--out", type=Path, default=Path("reports/opinfo.md"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no per-op progress")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="rewrite the report (--out) from a saved --json run instead of running",
    )
    p.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="with --from-json: a saved re-run of some ops (after a fix); its "
        "results replace the base run's for those ops and the checks it ran",
    )
    p.add_argument(
        "--command",
        default=None,
        help="with --from-json: the command the saved run was made with",
    )
    p.add_argument(
        "--wall-seconds",
        type=float,
        default=None,
        help="with --from-json: the saved run's wall time (JSONs written before "
        "it was recorded)",
    )
    args = p.parse_args(argv)
    if args.from_json is not None:
        doc = merge_runs(
            json.loads(args.from_json.read_text()),
            [json.loads(m.read_text()) for m in args.merge],
        )
        selection, results = from_json(doc)
        summary = summarize(selection, results)
        write_markdown(
            args.out,
            summary,
            results,
            command=args.command or doc.get("command", "(see the saved run)"),
            wall_seconds=args.wall_seconds or float(doc.get("wall_seconds", math.nan)),
            settings=doc["settings"],
        )
        print(
            f"all: agreement {summary['all_agree']}/{summary['all_compared']} = "
            f"{100 * summary['all_agreement']:.2f}%; report {args.out}"
        )
        return 0
    filters = (
        [f for item in args.ops for f in item.split(",") if f] if args.ops else None
    )
    warnings.filterwarnings("ignore")
    checks = tuple(c for c in args.checks.split(",") if c)
    unknown = set(checks) - set(ALL_CHECKS)
    if unknown:
        p.error(f"--checks: unknown {sorted(unknown)}; choose from {ALL_CHECKS}")
    selection = select_ops(filters, exact=args.exact, limit=args.limit)
    settings = {
        "max_samples": args.max_samples,
        "seed": args.seed,
        "budget": args.budget,
        "workers": args.workers,
        "memory_gb": args.memory_gb,
        "float32": not args.no_float32,
        "filters": filters,
        "exact": args.exact,
        "limit": args.limit,
        "checks": list(checks),
    }
    done = [0]

    def progress(r: OpResult) -> None:
        done[0] += 1
        if args.quiet:
            return
        bad = [x for x in r.results if x.comparison != "agree"]
        flag = f" <- {len(bad)} not agreeing" if bad else ""
        print(
            f"[{done[0]}/{len(selection.ops)}] {r.op}: {len(r.results)} samples, "
            f"{r.seconds:.1f} s{flag}",
            file=sys.stderr,
            flush=True,
        )

    if args.workers <= 1:
        limit_memory(args.memory_gb)
    t0 = time.perf_counter()
    results = sweep(
        selection.ops,
        max_samples=args.max_samples,
        seed=args.seed,
        budget=args.budget,
        float32=not args.no_float32,
        workers=args.workers,
        memory_gb=args.memory_gb,
        progress=progress,
        checks=checks,
    )
    wall = time.perf_counter() - t0
    summary = summarize(selection, results)
    shown = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["PYTHONPATH=. python benchmarks/opinfo_sweep.py", *shown])
    write_markdown(
        args.out,
        summary,
        results,
        command=command,
        wall_seconds=wall,
        settings=settings,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = to_json(summary, results, settings)
        doc.update(command=command, wall_seconds=wall)
        args.json.write_text(json.dumps(doc, indent=1))
    s = summary
    print(
        f"ops {s['ops_run']}, samples {s['samples_run']}; float64 agreement "
        f"{s['agree']}/{s['compared']} = {100 * s['agreement']:.2f}% "
        f"({s['disagree']} disagreements, {s['disagreements_explained']} explained, "
        f"{s['gradcheck_false_alarms_float64']} gradcheck false alarms); not "
        f"compared {s['not_compared']} (gradcheck crashes "
        f"{sum(s['gradcheck_crashes'].values())}); float32 mismatches where float64 "
        f"passed: {s['float32_mismatches_where_float64_passed']}; wall {wall:.0f} s; "
        f"torch {s['seconds_torch_float64']:.0f} s vs gradcheck "
        f"{s['seconds_gradcheck_float64']:.0f} s (ratio total "
        f"{s['ratio_total_gradcheck_over_torch']:.2f}, median per sample "
        f"{s['ratio_median_gradcheck_over_torch']:.2f}); report {args.out}"
    )
    for kind in EXTRA_KINDS:
        k = s["extra"][kind]
        if k["samples"]:
            print(
                f"{kind}: agreement {k['agree']}/{k['compared']}, "
                f"{k['disagree']} disagreements ({k['unexplained']} unexplained), "
                f"{k['not_compared']} not compared"
            )
    print(
        f"all: agreement {s['all_agree']}/{s['all_compared']} = "
        f"{100 * s['all_agreement']:.2f}%, unexplained {s['all_unexplained']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
