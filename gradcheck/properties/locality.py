"""The locality property: which loss reaches which parameter, against the architecture.

For a multi-head model trained on ``total = sum_i w_i * L_i`` the architecture says
which parameters each loss may touch: a head's own layers only its loss, the section
between a branch point and a head only the losses of the heads below it, the shared
trunk every loss. ``expected`` states that, by tensor name, layer name or glob
pattern; :func:`gradcheck.architectures.expected_flow` derives it from a spec.

The check has three parts, all on the framework's own gradients:

1. *Reach*: for every (tensor, loss) pair, dL_i/d(tensor) is non-zero exactly where
   ``expected`` says the loss reaches the tensor. A loss that reaches a tensor it
   should not is a leak (a head wired to the wrong source, a shared layer that was
   meant to be separate); one that does not reach a tensor it should is a cut (a
   ``detach``, ``stop_gradient``, a frozen branch).
2. *Weights*: grad(total) = sum_i w_i grad(L_i) in every tensor (the linearity
   check's :func:`~gradcheck.properties.linearity.judge`, so a head's own parameters
   get exactly their loss's gradient times its weight).
3. *Zero weights*: a tensor only zero-weight losses reach gets exactly zero gradient
   from the total (bitwise, not within a tolerance: ``0 * g`` is exactly 0, so any
   non-zero value means the total contains that loss through another path).

Reach is structural: whether the loss's graph connects to the tensor at all (the
backends return no gradient for an unconnected tensor). So a detach or
``stop_gradient`` is a cut, while a connected path whose gradient vanishes at this
point (every ReLU on it dead, an L1 penalty on a softmax output, whose sum is always
1) is not.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from gradcheck.backends.base import Session
from gradcheck.errors import InvalidArgumentError, UnsupportedInputError
from gradcheck.properties import linearity
from gradcheck.result import CheckReport, Location

__all__ = ["match_expected", "run", "validate_expected"]

_SEPARATOR = re.compile(r"[./]")


def validate_expected(
    expected: Any, losses: Iterable[str]
) -> dict[str, frozenset[str]]:
    """``expected`` as ``{pattern: frozenset(losses)}``; unknown loss names fail."""
    if not isinstance(expected, Mapping) or not expected:
        raise InvalidArgumentError(
            "expected must be a non-empty dict {tensor name, layer name or glob: the "
            "losses that should reach it}, e.g. {'trunk': ['main', 'aux'], 'heads.aux': "
            "['aux']}; gradcheck.architectures.expected_flow(built) derives it from a "
            f"spec. Got {type(expected).__name__}."
        )
    known = set(losses)
    out: dict[str, frozenset[str]] = {}
    for pattern, names in expected.items():
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgumentError(
                f"expected's keys are tensor names, layer names or globs; got {pattern!r}."
            )
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise InvalidArgumentError(
                f"expected[{pattern!r}] must be a list of loss names, got {names!r}."
            )
        names = frozenset(str(n) for n in names)
        unknown = sorted(names - known)
        if unknown:
            raise InvalidArgumentError(
                f"expected[{pattern!r}] names losses {unknown} that are not in loss_fns "
                f"({sorted(known)})."
            )
        out[pattern] = names
    return out


def match_expected(
    tensor: str, expected: Mapping[str, frozenset[str]]
) -> frozenset[str] | None:
    """The losses expected to reach ``tensor``: an exact name wins, then the longest
    dotted/slashed prefix (``"heads.aux"`` covers ``"heads.aux.0.weight"``), then the
    first matching glob. None when nothing matches."""
    if tensor in expected:
        return expected[tensor]
    for sep in reversed(list(_SEPARATOR.finditer(tensor))):
        prefix = tensor[: sep.start()]
        if prefix in expected:
            return expected[prefix]
    for pattern, names in expected.items():
        if fnmatch.fnmatchcase(tensor, pattern):
            return names
    return None


def run(
    session: Session,
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    weights: Mapping[str, float],
    expected: Mapping[str, Iterable[str]],
    *,
    seed: int,
    rtol: float | None = None,
) -> CheckReport:
    started = time.perf_counter()
    names, w = linearity.validate(loss_fns, weights)
    patterns = validate_expected(expected, names)
    if not callable(total_fn):
        raise UnsupportedInputError(
            f"total_fn must be callable; got {type(total_fn).__name__}."
        )
    specs = session.specs
    want: list[frozenset[str]] = []
    unmatched = []
    for s in specs:
        m = match_expected(s.name, patterns)
        if m is None:
            unmatched.append(s.name)
        want.append(m or frozenset())
    if unmatched:
        raise InvalidArgumentError(
            f"expected says nothing about {len(unmatched)} tensor(s): "
            f"{unmatched[:6]}{' ...' if len(unmatched) > 6 else ''}. Add their names, "
            "their layer's name or a glob (use [] for a tensor no loss should reach)."
        )

    total_val, g_total = session.value_and_grads(total_fn, "total_fn")
    linearity._finite(session, "total_fn", total_val, g_total)
    vals, grads = {}, {}
    for n in names:
        vals[n], grads[n] = session.value_and_grads(loss_fns[n], f"loss_fns[{n!r}]")
        linearity._finite(session, f"loss '{n}'", vals[n], grads[n])
    linearity.require_connected(session, g_total, grads)
    report = linearity.judge_session(
        session,
        total_fn,
        loss_fns,
        w,
        (total_val, g_total),
        (vals, grads),
        seed,
        rtol,
        property="locality",
    )
    flow = report.flow
    assert flow is not None  # judge always builds one
    flow.expected = [[n in want[t] for n in names] for t in range(len(specs))]
    # reach is structural here: whether the loss's graph connects to the tensor at
    # all (the backends return None for an unconnected tensor). A connected path
    # whose gradient happens to vanish (dead ReLUs, an L1 penalty on a softmax,
    # whose sum is always 1) is no cut; a detach or stop_gradient is.
    flow.reaches = [[grads[n][t] is not None for n in names] for t in range(len(specs))]

    # a loss connected to no tensor at all (a constant) says nothing about the
    # graph: its cuts are not judged, and the report says so
    silent = {n for i, n in enumerate(names) if not any(r[i] for r in flow.reaches)}
    if silent:
        report.notes.append(
            f"{_list(silent)} is connected to no differentiated tensor (a constant "
            "loss?): where it should reach was not judged."
        )
    violations: list[tuple[float, Location, str]] = []
    for t, spec in enumerate(specs):
        for i, n in enumerate(names):
            reached, should = flow.reaches[t][i], n in want[t]
            if reached == should or n in silent:
                continue
            norm = float(np.linalg.norm(grads[n][t])) if reached else 0.0
            if reached:
                text = (
                    f"loss '{n}' reaches '{spec.name}' (gradient norm {norm:.3e}) but "
                    f"the architecture says only {_list(want[t])} should: a leak (a "
                    "head wired to the wrong layer, or a layer shared by mistake)."
                )
            else:
                text = (
                    f"loss '{n}' does not reach '{spec.name}' although the architecture "
                    "says it should: its graph is cut on the way (detach, "
                    "stop_gradient, no_grad, a layer re-created or called on a copy)."
                )
            loc = Location(
                tensor=spec.name,
                error=norm if reached else None,
                quantity=(
                    "gradient (should be exactly zero: a leak)"
                    if reached
                    else "gradient (exactly zero: a cut)"
                ),
                head=n,
            )
            violations.append((1.0, loc, text))
        zero_only = want[t] and all(w[n] == 0.0 for n in want[t])
        total_norm = flow.total_norms[t]
        if zero_only and total_norm != 0.0:
            loc = Location(
                tensor=spec.name,
                numerical=0.0,
                analytical=total_norm,
                error=total_norm,
                tolerance=0.0,
                quantity="norm of grad(total) (must be exactly 0)",
                head=sorted(want[t])[0],
            )
            violations.append(
                (
                    2.0,
                    loc,
                    f"only zero-weight losses ({_list(want[t])}) should reach "
                    f"'{spec.name}', yet the total's gradient there has norm "
                    f"{total_norm:.3e}: the total contains that loss by another path "
                    "(or with another weight).",
                ),
            )
    if violations:
        violations.sort(key=lambda v: -v[0])
        report.status = "mismatch"
        report.location = violations[0][1]
        # the error counts violations: none is tolerated
        report.error, report.tolerance = float(len(violations)), 0.0
        more = len(violations) - 8
        report.notes = (
            [v[2] for v in violations[:8]]
            + ([f"... and {more} more reach violations"] if more > 0 else [])
            + report.notes  # the weights' verdict, if it failed too
        )
    report.tolerance_reason = (
        "reach is exact: the error counts (tensor, loss) pairs whose gradient is "
        "zero where the architecture says non-zero or the reverse; "
        + report.tolerance_reason.replace("per element", "the weights, per element")
    )
    if not report.passed:
        linearity.check_nondeterminism(session, total_fn, total_val, g_total, report)
    return session.finish(report, started)


def _list(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(f"'{n}'" for n in names) if names else "no loss"
