"""The one result model every front door shares.

A :class:`CheckReport` is what ``check_*`` returns, what ``assert_*`` raises inside a
:class:`~gradcheck.errors.GradientMismatchError`, and (through :meth:`CheckReport.to_dict`)
the single source of every JSON/HTML report the project writes. It carries its
evidence: what was compared, how far apart, the tolerance and why it is what it is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NOT_RUN",
    "STATUSES",
    "CheckReport",
    "FlowMatrix",
    "Location",
    "StepEstimate",
    "TensorResult",
]

#: Every status a report can have, best first. "skipped": nothing could be
#: compared on this machine (check_variants with only GPU variants and no GPU);
#: the notes say why, assert_* do not raise on it and the pytest fixture skips.
STATUSES = (
    "passed",
    "skipped",
    "mismatch",
    "nondifferentiable",
    "nondeterministic",
    "unbuildable",
    "timeout",
    "error",
)
#: Statuses of a check that reached no verdict (gradcheck.check_model): the model
#: could not be built, the check ran past its time limit, or it raised a
#: GradcheckError. The first note says why; error and tolerance are NaN.
NOT_RUN = ("unbuildable", "timeout", "error")


@dataclass
class Location:
    """Where a check went wrong: a tensor by name and an element by index."""

    tensor: str
    index: tuple[int, ...] | None = None
    numerical: float | None = None
    analytical: float | None = None
    error: float | None = None
    tolerance: float | None = None
    #: What the numbers are: "partial derivative", "directional derivative", ...
    quantity: str = "partial derivative"
    #: For linearity checks: the loss/head this location concerns, if one. When
    #: ``tensor == head`` the location is that loss's value itself.
    head: str | None = None

    def describe(self) -> str:
        idx = "" if self.index is None else "[" + ", ".join(map(str, self.index)) + "]"
        return f"'{self.tensor}'{idx}"


@dataclass
class TensorResult:
    """One differentiated tensor (an input or a parameter) and what was seen of it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    kind: str  # "input" or "parameter"
    grad_norm: float
    #: Directional contribution <g_t, d_t> of the analytical gradient.
    analytical: float | None = None
    #: The same quantity from finite differences, when measured for this tensor alone.
    numerical: float | None = None
    error: float | None = None
    tolerance: float | None = None
    status: str | None = None
    #: False when the function's output does not depend on this tensor at all.
    connected: bool = True


@dataclass
class StepEstimate:
    """One finite-difference estimate of the directional derivative at one step."""

    step: float
    estimate: float
    #: |estimate - final| - the error-vs-step curve drawn in the HTML report.
    deviation: float | None = None


@dataclass
class FlowMatrix:
    """Which loss reaches which tensor: norms of w_i * grad(L_i) per tensor.

    ``norms[t][i]`` is ||w_i * dL_i/d(tensor t)||_2; ``reaches[t][i]`` says whether
    dL_i/d(tensor t) is non-zero (the loss reaches the tensor through the graph at
    all, whatever its weight). ``effective_weights[t][i]`` is the weight loss i
    actually has in grad(total) for tensor t (least squares; None where it does not
    reach): equal to ``weights[i]`` when the total is right.
    """

    tensors: list[str]
    losses: list[str]
    weights: list[float]
    norms: list[list[float]]
    reaches: list[list[bool]]
    total_norms: list[float]
    effective_weights: list[list[float | None]] = field(default_factory=list)
    #: For the locality check: whether the architecture says loss i reaches tensor t.
    expected: list[list[bool]] = field(default_factory=list)

    def reached_by(self, tensor: str) -> list[str]:
        row = self.reaches[self.tensors.index(tensor)]
        return [loss for loss, r in zip(self.losses, row, strict=True) if r]


@dataclass
class CheckReport:
    """The outcome of one gradient check, with its evidence."""

    property: str  # "finite_difference" or "linearity"
    status: str
    framework: str
    device: str
    dtype: str
    seed: int
    mode: str  # "directional" or "full" (finite differences); "analytic" (linearity)
    error: float
    tolerance: float
    tolerance_reason: str
    #: The named terms the tolerance is made of (e.g. "finite_difference": 1e-12).
    tolerance_terms: dict[str, float] = field(default_factory=dict)
    reference_dtype: str | None = None
    location: Location | None = None
    tensors: list[TensorResult] = field(default_factory=list)
    steps: list[StepEstimate] = field(default_factory=list)
    flow: FlowMatrix | None = None
    notes: list[str] = field(default_factory=list)
    #: Work done: {"forward": n, "backward": m, "seconds": s}.
    cost: dict[str, float] = field(default_factory=dict)
    #: Free-form label supplied by callers (a test id, an audit case).
    label: str | None = None
    #: The repro bundle written for this failing check (``repro_dir=``,
    #: ``--repro-dir``): a directory ``gradcheck replay`` reruns. See
    #: :mod:`gradcheck.repro`.
    repro_bundle: str | None = None
    #: Derivative order checked: 1 (gradients) or 2 (gradients of gradients:
    #: gradgradcheck's question, Hessian-vector products of a loss).
    order: int = 1
    #: Which automatic differentiation was judged: "reverse" (backward),
    #: "forward" (jvp) or "both" (each against finite differences, and forward
    #: against reverse).
    ad: str = "reverse"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(
                f"unknown status {self.status!r}; expected one of {STATUSES}"
            )

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __bool__(self) -> bool:  # `if report:` reads naturally
        return self.passed

    # ------------------------------------------------------------------ text
    def headline(self) -> str:
        prop = self.property.replace("_", "-")
        if self.order != 1 or self.ad != "reverse":
            kind = [f"order {self.order}"] if self.order != 1 else []
            modes = {"forward": "forward mode", "both": "forward and reverse mode"}
            kind += (
                [modes.get(self.ad, f"{self.ad} mode")] if self.ad != "reverse" else []
            )
            prop += f" ({', '.join(kind)})"
        verdict = "passed" if self.passed else f"FAILED ({self.status})"
        if self.status in NOT_RUN:
            verdict = f"not run ({self.status})"
        elif self.status == "skipped":
            verdict = "skipped"
        where = f" at {self.location.describe()}" if self.location else ""
        return f"gradcheck: {prop} check {verdict}{where}"

    def message(self) -> str:
        """A failure message a person can act on. No tensor dumps."""
        lines = [self.headline()]
        if self.status in (*NOT_RUN, "skipped"):  # no numbers to show: the reason
            lines.extend(f"  {n}" for n in self.notes)
            lines.extend(self._repro_lines())
            return "\n".join(lines)
        loc = self.location
        if loc is not None:
            what = loc.quantity + (f" of loss '{loc.head}'" if loc.head else "")
            numbers = (loc.numerical, loc.analytical, loc.tolerance)
            colon = ":" if any(v is not None for v in numbers) else ""
            # tensor == head or a "loss value" quantity: a value, not a gradient
            value = loc.tensor == loc.head or loc.quantity.startswith("loss value")
            wrt = "" if value else f" w.r.t. {loc.describe()}"
            lines.append(f"  {what}{wrt}{colon}")
            if loc.numerical is not None:
                lines.append(f"    numerical  = {_fmt(loc.numerical)}")
            if loc.analytical is not None:
                lines.append(f"    analytical = {_fmt(loc.analytical)}")
            if loc.error is not None and loc.tolerance is not None:
                lines.append(
                    f"    |error|    = {_fmt(loc.error)}  (tolerance {_fmt(loc.tolerance)})"
                )
        if not (math.isnan(self.error) and math.isnan(self.tolerance)):
            # a refusal (e.g. a backward torch cannot differentiate) has no numbers
            cmp = ">" if self.error > self.tolerance else "<="
            lines.append(
                f"  overall: error {_fmt(self.error)} {cmp} tolerance "
                f"{_fmt(self.tolerance)}"
            )
        lines.append(f"  tolerance: {self.tolerance_reason}")
        ref = f", reference {self.reference_dtype}" if self.reference_dtype else ""
        lines.append(
            f"  {self.framework}, dtype {self.dtype}{ref}, device {self.device}, "
            f"mode {self.mode}; reproduce with seed={self.seed}"
        )
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(self._repro_lines())
        return "\n".join(lines)

    def _repro_lines(self) -> list[str]:
        if not self.repro_bundle:
            return []
        return [
            f"  repro bundle: {self.repro_bundle} "
            f"(rerun it: gradcheck replay {self.repro_bundle})"
        ]

    def __str__(self) -> str:
        return self.message()

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; the source of every report gradcheck writes."""
        d = _jsonable(dataclasses.asdict(self))
        d["passed"] = self.passed
        d["headline"] = self.headline()
        d["message"] = self.message()
        return d


def _fmt(x: float) -> str:
    return f"{x:.6e}" if math.isfinite(x) else str(x)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float) or hasattr(obj, "__float__"):
        f = float(obj)
        return f if math.isfinite(f) else str(f)  # JSON has no NaN/Inf
    return str(obj)
