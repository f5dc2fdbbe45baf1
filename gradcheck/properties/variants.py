"""The variants property: a model's gradients are the same, within the precision of
the variant, when the training step runs compiled, under autocast or on another
device as in plain eager execution.

A variant is a ``+``-joined combination of at most one of each:

* ``"compile"``: ``torch.compile(loss_fn)`` with the default backend (the whole
  loss function is compiled, as a compiled training step would be);
* ``"autocast:bfloat16"`` / ``"autocast:float16"``: ``torch.autocast`` on the
  variant's device type;
* a device, ``"cpu"``, ``"cuda"``, ``"cuda:1"``: the model and batch copied there;
* ``"xla"``: TensorFlow/Keras - the loss and its gradient in one
  ``tf.function(jit_compile=True)``. A TensorFlow model runs ``"xla"`` and devices
  only (``"compile"``/autocast are torch's: UnsupportedInputError); its reference
  is eager execution in the model's dtype (gradcheck does not cast a Keras model to
  float64), whose own rounding the tolerance then counts (x sqrt(2)).

e.g. ``"cuda+autocast:float16"``, ``"compile+autocast:bfloat16"``. A variant that
cannot run on this machine (a GPU variant without a GPU, autocast a torch build
lacks) is *skipped*, not failed: its reason is a note of the report, and a report
whose every variant was skipped has status ``"skipped"`` (``assert_variants`` does
not raise on it; the pytest fixture skips the test).

What is compared, per variant, on fresh deep copies of the model (the user's module,
``.grad``, buffers, train/eval flags and every RNG are left as they were):

* ``g_v``: every trainable parameter's gradient under the variant, at the point;
* ``r``: the reference, the eager gradient at the point in float64 (model and
  floating batch tensors cast to float64) when the model is float32, else in the
  model's dtype (also when the model cannot run in float64);
* the error of each tensor is ``||g_v - r||_2``.

Tolerance, measured at check time (no table): the rounding noise of the variant's
precision on this model and batch. The variant *without compile* (same device,
same autocast) is evaluated eagerly at the point, ``e_0``, and at ``SPREAD_POINTS``
points moved by about one unit in the last place of the variant's precision
``d`` (the autocast dtype, else the model's), ``e_k``: every floating parameter and
batch tensor ``x`` becomes ``x (1 + eps_d u)``, u uniform in [-1, 1]. Each such
evaluation rounds differently - the autocast casts of the weights move by an ulp,
every intermediate rounds the other way about half the time - so
``||e_k - e_0|| / sqrt(2)`` samples the size of one evaluation's rounding error in
this tensor, as the model's conditioning amplifies it (the part of the move the
true gradient makes, Hessian x eps_d, only adds to it: conservative). A bias
that a variant adds consistently (a wrong backward under autocast) is the same in
``e_k`` and ``e_0`` and cancels: the spread does not grow with the bug it is to
catch. Per tensor::

    sigma_t     = sqrt(mean_k ||e_k - e_0||^2 / 2)
    tolerance_t = ROUNDING_SIGMAS * sqrt(sigma_t^2 + (eps_d ||r_t||)^2
                                         + (eps_d ||r||)^2)

(the second term, one ulp of the tensor, keeps a tensor whose rounding happened
to cancel from getting a zero tolerance; the third, one ulp of d at the scale of
the whole gradient ``r``, is the rounding a small tensor's gradient inherits from
the full-size gradients it is computed from, which two moved points can miss:
the audit found an attention query bias whose gradient, 1e-4 of the model's,
came out 30% off under a correct bfloat16 autocast, 8x its measured spread, and
a key bias whose true gradient is 0 - softmax ignores a shift common to a row -
at 7e-18 in the float64 reference and exactly 0 under the variant. A bug must
move a tensor's gradient by more than that ulp of the whole gradient to be seen:
bfloat16 cannot tell less from its own rounding). A tensor fails when its error exceeds
its tolerance, or when it is NaN/Inf under the variant and finite in the
reference (float16 overflow: a note says so), or connected to the loss in one and
not the other. The verdict names the variant (notes) and the tensor
(``location``); ``report.tensors`` holds one entry per (variant, tensor), named
``"<variant>/<tensor>"``.

Cost: ``report.cost["seconds"]`` is the time of the check without compilation,
``report.cost["compile_seconds"]`` the compile time (first compiled call minus the
second), per variant too (``"compile_seconds[<variant>]"``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcheck.backends import variant_driver
from gradcheck.errors import (
    GradientMismatchError,
    InvalidArgumentError,
    NonFiniteError,
    UnsupportedInputError,
)
from gradcheck.numeric import tolerance as tl
from gradcheck.result import CheckReport, Location, TensorResult

__all__ = [
    "DEFAULT_VARIANTS",
    "PROPERTY",
    "SPREAD_POINTS",
    "Variant",
    "assert_variants",
    "check_variants",
    "judge_tensor",
    "parse_variant",
    "run",
]

PROPERTY = "variants"

#: What ``variants=None`` checks for a torch model (GPU ones are skipped without a
#: GPU).
DEFAULT_VARIANTS = ("compile", "autocast:bfloat16", "autocast:float16", "cuda")

#: Moved points whose spread measures the variant's rounding.
SPREAD_POINTS = 2

AUTOCAST_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class Variant:
    """One parsed variant string."""

    name: str
    compiled: bool = False
    autocast: str | None = None
    device: str | None = None
    xla: bool = False

    @property
    def eager(self) -> str:
        """The variant without compilation (its spread is measured there)."""
        parts = [
            p for p in (self.device, self.autocast and f"autocast:{self.autocast}")
        ]
        return "+".join(p for p in parts if p) or "eager"


def parse_variant(text: Any) -> Variant:
    """``"cuda+autocast:float16"`` -> Variant(device="cuda", autocast="float16")."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(
            f"a variant is a non-empty string such as 'compile' or "
            f"'cuda+autocast:float16'; got {text!r}."
        )
    fields: dict[str, Any] = {}
    for raw in text.split("+"):
        token = raw.strip().lower()
        if token == "compile":
            key, value = "compiled", True
        elif token == "xla":
            key, value = "xla", True
        elif token.startswith("autocast"):
            dtype = token.partition(":")[2] or "bfloat16"
            dtype = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(
                dtype, dtype
            )
            if dtype not in AUTOCAST_DTYPES:
                raise InvalidArgumentError(
                    f"variant {text!r}: autocast dtype {dtype!r}; expected one of "
                    f"{list(AUTOCAST_DTYPES)}."
                )
            key, value = "autocast", dtype
        elif token == "cpu" or token == "cuda" or token.startswith("cuda:"):
            if token.startswith("cuda:") and not token[5:].isdigit():
                raise InvalidArgumentError(
                    f"variant {text!r}: device {token!r}; expected cuda:<index>."
                )
            key, value = "device", token
        else:
            raise InvalidArgumentError(
                f"variant {text!r}: unknown part {raw!r}. Parts: 'compile', "
                "'autocast:bfloat16', 'autocast:float16', 'xla', 'cpu', 'cuda', "
                "'cuda:<index>', joined with '+'."
            )
        if key in fields:
            raise InvalidArgumentError(f"variant {text!r} names {key} twice.")
        fields[key] = value
    if fields.get("xla") and fields.get("compiled"):
        raise InvalidArgumentError(
            f"variant {text!r}: 'xla' is TensorFlow's compiler, 'compile' torch's."
        )
    return Variant(name=text.strip(), **fields)


def _variants(variants: Any) -> list[Variant]:
    if variants is None:
        variants = DEFAULT_VARIANTS
    if isinstance(variants, str):
        variants = (variants,)
    out = [parse_variant(v) for v in variants]
    if not out:
        raise InvalidArgumentError("variants is empty: name at least one variant.")
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"variants {names} name one variant twice.")
    return out


# ====================================================================== the core
@dataclass
class TensorVerdict:
    name: str
    shape: tuple[int, ...]
    error: float
    tolerance: float
    sigma: float
    reference_norm: float
    variant_norm: float
    index: tuple[int, ...] | None
    reference_value: float | None
    variant_value: float | None
    connected: bool
    nonfinite: int = 0

    @property
    def ratio(self) -> float:
        if self.nonfinite:
            return math.inf
        if self.tolerance > 0:
            return self.error / self.tolerance
        return 0.0 if self.error == 0 else math.inf


def judge_tensor(
    name: str,
    reference: np.ndarray | None,
    variant: np.ndarray | None,
    base: np.ndarray | None,
    moved: Sequence[np.ndarray | None],
    eps: float,
    *,
    reference_rounds: bool = False,
    whole_floor: float = 0.0,
) -> TensorVerdict:
    """One tensor (pure NumPy; None = not connected to the loss, compared as
    zeros): the variant's error against the reference and the tolerance from the
    spread of the eager evaluations ``moved`` around ``base`` (module docstring).
    ``reference_rounds``: the reference is in the variant's precision (no float64
    reference), so the difference carries two evaluations' rounding.
    ``whole_floor``: one ulp of the variant's precision at the scale of the
    whole gradient (eps_d x ||r|| over every tensor), the rounding a tensor's
    gradient inherits from the full-size gradients it is computed from."""
    arrays = [a for a in (reference, variant, base, *moved) if a is not None]
    if not arrays:  # reached by the loss in no execution: they agree
        return TensorVerdict(name, (), 0.0, 0.0, 0.0, 0.0, 0.0, None, None, None, True)
    shape = arrays[0].shape

    def full(a: np.ndarray | None) -> np.ndarray:
        return np.zeros(shape) if a is None else np.asarray(a, dtype=np.float64)

    r, g, b = full(reference), full(variant), full(base)
    if r.shape != g.shape:
        raise InvalidArgumentError(
            f"'{name}' has shape {r.shape} in the reference and {g.shape} under the "
            "variant."
        )
    finite = np.isfinite(g)
    nonfinite = int(np.sum(~finite & np.isfinite(r)))
    diff = np.where(finite, g - r, 0.0)
    samples = [full(m) - b for m in moved]
    samples = [np.where(np.isfinite(s), s, 0.0) for s in samples]
    sigma = (
        math.sqrt(sum(float(np.sum(s * s)) for s in samples) / (2 * len(samples)))
        if samples
        else 0.0
    )
    r_norm = float(np.linalg.norm(np.where(np.isfinite(r), r, 0.0)))
    # a reference in the variant's own precision carries a rounding of its own
    both = 2.0 if reference_rounds else 1.0
    tol = tl.ROUNDING_SIGMAS * math.sqrt(
        both * sigma**2 + (eps * r_norm) ** 2 + whole_floor**2
    )
    error = float(np.linalg.norm(diff))
    connected = (reference is not None) == (variant is not None)
    if not connected and error == 0.0:
        error = 0.0  # both zero-valued: one side just did not build the edge
        connected = True
    # the element that stands out most against its own spread
    el_sigma = (
        np.sqrt(sum(s * s for s in samples) / (2 * len(samples)))
        if samples
        else np.zeros(shape)
    )
    el_tol = el_sigma + eps * np.abs(r) + 1e-300
    score = np.where(finite, np.abs(diff) / el_tol, np.inf)
    index = None
    rv = gv = None
    if score.size:
        k = int(np.argmax(score))
        index = tuple(int(i) for i in np.unravel_index(k, shape)) if shape else ()
        rv, gv = float(r.reshape(-1)[k]), float(g.reshape(-1)[k])
    return TensorVerdict(
        name=name,
        shape=tuple(shape),
        error=error,
        tolerance=tol,
        sigma=sigma,
        reference_norm=r_norm,
        variant_norm=float(np.linalg.norm(np.where(finite, g, 0.0))),
        index=index,
        reference_value=rv,
        variant_value=gv,
        connected=connected,
        nonfinite=nonfinite,
    )


@dataclass
class VariantRun:
    variant: Variant
    precision: str
    device: str
    tensors: list[TensorVerdict]
    seconds: float
    compile_seconds: float
    evaluations: int
    #: random-number ops the eager evaluation ran (reported by the TF driver)
    random_ops: list[str] = field(default_factory=list)

    @property
    def worst(self) -> TensorVerdict:
        return max(self.tensors, key=lambda t: (t.ratio, t.error))

    @property
    def passed(self) -> bool:
        return all(t.ratio <= 1.0 and t.connected for t in self.tensors)


# ====================================================================== front doors
def check_variants(
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    batch: Any,
    *,
    variants: str | Sequence[str] | None = None,
    seed: int | None = None,
    rtol: float | None = None,
    label: str | None = None,
) -> CheckReport:
    """Check that ``model``'s gradients under each variant (``"compile"``,
    ``"autocast:bfloat16"``, ``"autocast:float16"``, ``"cuda"``, ``"cuda:1"`` and
    ``+``-combinations such as ``"cuda+autocast:float16"``) agree with eager
    execution, within the variant's measured rounding (see the module docstring).

    ``loss_fn(model, batch)`` returns the scalar loss and must use the model and
    batch it is given (gradcheck passes copies). ``seed`` seeds torch's generators
    before every evaluation (dropout draws the same) and the moved points;
    ``rtol``, when given, replaces the measured tolerance: a tensor fails when
    ``||g_v - r|| > rtol * ||r||``. Variants that cannot run here are skipped with
    a note. Returns a report with property ``"variants"``."""
    from gradcheck import api

    report = run(
        loss_fn, model, batch, variants=variants, seed=api._seed(seed), rtol=rtol
    )
    return api._publish(report, label)


def assert_variants(
    loss_fn: Callable[[Any, Any], Any], model: Any, batch: Any, **kwargs: Any
) -> CheckReport:
    """Like :func:`check_variants`; raises :class:`GradientMismatchError` on failure
    (not when every variant was skipped: status ``"skipped"``)."""
    report = check_variants(loss_fn, model, batch, **kwargs)
    if report.status not in ("passed", "skipped"):
        raise GradientMismatchError(report)
    return report


def run(
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    batch: Any,
    *,
    variants: str | Sequence[str] | None = None,
    seed: int = 0,
    rtol: float | None = None,
) -> CheckReport:
    """The engine behind :func:`check_variants` (no seed resolution, no listeners)."""
    started = time.perf_counter()
    if not callable(loss_fn):
        raise UnsupportedInputError(
            f"loss_fn must be callable as loss_fn(model, batch); got "
            f"{type(loss_fn).__name__}."
        )
    if rtol is not None:
        tl.gradient_rounding("float64", rtol)  # validates
    wanted = _variants(variants)
    driver = variant_driver(loss_fn, model, batch)
    try:
        for v in wanted:
            driver.supported(v)
        precision = driver.precision()
        reference, reference_dtype, ref_note = _reference(driver, seed)
        runs: list[VariantRun] = []
        skipped: list[str] = []
        compile_total = 0.0
        for v in wanted:
            why = driver.unavailable(v)
            if why is not None:
                skipped.append(f"variant '{v.name}' skipped: {why}")
                continue
            r = _measure(driver, v, reference, reference_dtype, precision, seed, rtol)
            compile_total += r.compile_seconds
            runs.append(r)
        elapsed = time.perf_counter() - started
        cost = {
            "forward": float(driver.evaluations),
            "backward": float(driver.evaluations),
            "seconds": max(0.0, elapsed - compile_total),
            "compile_seconds": compile_total,
        }
        for r in runs:
            if r.variant.compiled or r.variant.xla:
                cost[f"compile_seconds[{r.variant.name}]"] = r.compile_seconds
        return _report(
            driver,
            runs,
            skipped,
            precision=precision,
            reference_dtype=reference_dtype,
            notes=[ref_note] if ref_note else [],
            seed=seed,
            rtol=rtol,
            cost=cost,
        )
    finally:
        driver.restore()


def _reference(driver: Any, seed: int) -> tuple[dict[str, Any], str, str | None]:
    precision = driver.precision()
    note = None
    if precision == "float32" and not driver.reference_float64:
        note = (
            f"the reference is eager {precision}: gradcheck does not cast a "
            f"{driver.framework} model to float64; its rounding is counted in the "
            "tolerance."
        )
    elif precision == "float32":
        try:
            ref = driver.gradients(float64=True, seed=seed)
            _validate(ref, "float64")
            return ref["grads"], "float64", None
        except NonFiniteError:
            raise
        except Exception as exc:  # the model does not run in float64
            note = (
                "the reference is eager float32: the model does not run in float64 "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]})."
            )
    ref = driver.gradients(seed=seed)
    _validate(ref, precision)
    return ref["grads"], precision, note


def _validate(ev: Mapping[str, Any], dtype: str) -> None:
    if not math.isfinite(ev["loss"]):
        raise NonFiniteError(
            f"loss_fn returned {ev['loss']} in eager {dtype}: a loss must be finite "
            "to have a gradient."
        )
    if all(g is None for g in ev["grads"].values()):
        raise UnsupportedInputError(
            "no parameter of the model reaches the loss: loss_fn(model, batch) must "
            "compute the loss with the model it is passed (gradcheck passes a copy), "
            "not one it captured, and must not detach it."
        )
    for name, g in ev["grads"].items():
        if g is not None and not np.isfinite(g).all():
            raise NonFiniteError(
                f"the eager {dtype} gradient of '{name}' has NaN/Inf elements while "
                "the loss is finite: the backward pass overflows or divides by zero."
            )


def _measure(
    driver: Any,
    v: Variant,
    reference: Mapping[str, Any],
    reference_dtype: str,
    precision: str,
    seed: int,
    rtol: float | None,
) -> VariantRun:
    before = driver.evaluations
    started = time.perf_counter()
    dtype = v.autocast or precision
    eps = tl.eps(dtype)
    kw = {"device": v.device, "autocast": v.autocast, "seed": seed}
    variant = driver.gradients(compiled=v.compiled, xla=v.xla, **kw)
    base = driver.gradients(**kw) if (v.compiled or v.xla) else variant
    moved = [
        driver.gradients(perturb=(seed * 1000 + k + 1, eps), **kw)["grads"]
        for k in range(SPREAD_POINTS)
    ]
    # one ulp of the variant's precision at the scale of the whole gradient
    floor = eps * math.sqrt(
        sum(
            float(np.sum(np.square(np.nan_to_num(np.asarray(r, np.float64)))))
            for r in (reference[n] for n in driver.names)
            if r is not None
        )
    )
    tensors = []
    for name in driver.names:
        t = judge_tensor(
            name,
            reference[name],
            variant["grads"][name],
            base["grads"][name],
            [m[name] for m in moved],
            eps,
            reference_rounds=reference_dtype == dtype,
            whole_floor=floor,
        )
        if rtol is not None:
            t.tolerance = rtol * t.reference_norm
        tensors.append(t)
    compile_seconds = variant["compile_seconds"]
    return VariantRun(
        variant=v,
        precision=dtype,
        device=v.device or driver.home,
        tensors=tensors,
        seconds=time.perf_counter() - started - compile_seconds,
        compile_seconds=compile_seconds,
        evaluations=driver.evaluations - before,
        random_ops=list(base.get("random_ops", [])),
    )


def _report(
    driver: Any,
    runs: list[VariantRun],
    skipped: list[str],
    *,
    precision: str,
    reference_dtype: str,
    notes: list[str],
    seed: int,
    rtol: float | None,
    cost: dict[str, float],
) -> CheckReport:
    source = (
        f"rtol {rtol:g} x ||r_t||"
        if rtol is not None
        else f"{tl.ROUNDING_SIGMAS:g} x sqrt(sigma_t^2 + (eps_d ||r_t||)^2 + "
        "(eps_d ||r||)^2), sigma_t "
        f"the measured rounding spread of the eager variant at {SPREAD_POINTS} points "
        "moved by ~1 ulp of its precision d, eps_d ||r|| one ulp of d at the scale "
        "of the whole gradient"
        + (
            f" (sigma_t^2 doubled: the reference is eager {reference_dtype}, rounded "
            "like the variant)"
            if reference_dtype != "float64" and rtol is None
            else ""
        )
    )
    common = dict(
        property=PROPERTY,
        framework=driver.framework,
        device=driver.home,
        dtype=precision,
        seed=seed,
        reference_dtype=reference_dtype,
        cost=cost,
    )
    if not runs:
        return CheckReport(
            status="skipped",
            mode="skipped",
            error=0.0,
            tolerance=0.0,
            tolerance_reason="no variant could run here; nothing was compared.",
            notes=[
                "SKIPPED: no requested variant can run on this machine.",
                *skipped,
                *notes,
            ],
            **common,
        )
    results: list[TensorResult] = []
    for r in runs:
        for t in r.tensors:
            ok = t.connected and t.ratio <= 1.0
            results.append(
                TensorResult(
                    name=f"{r.variant.name}/{t.name}",
                    shape=t.shape,
                    dtype=r.precision,
                    device=str(r.device),
                    kind="parameter",
                    grad_norm=t.variant_norm,
                    error=t.error,
                    tolerance=t.tolerance,
                    status="passed" if ok else "mismatch",
                    connected=t.connected,
                )
            )
    failing = [r for r in runs if not r.passed]
    shown = max(failing or runs, key=lambda r: (r.worst.ratio, r.worst.error))
    worst = shown.worst
    out_notes: list[str] = []
    for r in runs:
        w = r.worst
        timing = f"check {r.seconds:.2f} s" + (
            f", compile {r.compile_seconds:.2f} s"
            if r.variant.compiled or r.variant.xla
            else ""
        )
        if r.passed:
            out_notes.append(
                f"variant '{r.variant.name}' ({r.precision} on {r.device}) passed: "
                f"worst '{w.name}' error {w.error:.3e} <= tolerance "
                f"{w.tolerance:.3e} ({timing})."
            )
            continue
        bad = [t for t in r.tensors if not (t.connected and t.ratio <= 1.0)]
        text = (
            f"variant '{r.variant.name}' ({r.precision} on {r.device}) MISMATCH in "
            + ", ".join(f"'{t.name}'" for t in bad[:6])
            + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
            + f": worst '{w.name}' ||g_variant - g_eager|| = {w.error:.3e} > "
            f"tolerance {w.tolerance:.3e} ({_times(w)} the rounding measured for "
            f"{r.precision}; relative error {_rel(w)}) ({timing})."
        )
        nonfinite = [t for t in bad if t.nonfinite]
        if nonfinite:
            text += (
                " NaN/Inf under the variant where eager is finite in "
                + ", ".join(f"'{t.name}' ({t.nonfinite} elements)" for t in nonfinite)
                + (
                    ": float16 overflows above 65504 - scale the loss "
                    "(torch.amp.GradScaler) or use bfloat16."
                    if r.precision == "float16"
                    else "."
                )
            )
        if r.random_ops and r.variant.xla:
            text += (
                f" loss_fn draws random numbers ({', '.join(r.random_ops)}: dropout "
                "or noise in training mode) and XLA draws other numbers than eager "
                "execution from the same seed, so the two cannot agree: check with "
                "training=False or without the random layers."
            )
        unconnected = [t for t in bad if not t.connected]
        if unconnected:
            text += (
                " Connected to the loss in one execution and not the other: "
                + ", ".join(f"'{t.name}'" for t in unconnected)
                + "."
            )
        out_notes.append(text)
    out_notes.extend(skipped)
    out_notes.extend(notes)
    status = "mismatch" if failing else "passed"
    if failing and all(r.random_ops and r.variant.xla for r in failing):
        status = "nondeterministic"  # random draws differ, not the gradients
    location = Location(
        tensor=worst.name,
        index=worst.index,
        numerical=worst.reference_value,
        analytical=worst.variant_value,
        error=worst.error,
        tolerance=worst.tolerance,
        quantity=f"gradient under variant '{shown.variant.name}' (analytical) vs "
        f"eager {reference_dtype} (numerical), L2 over the tensor; values at its "
        "worst element",
    )
    return CheckReport(
        status=status,
        mode="variants",
        error=worst.error,
        tolerance=worst.tolerance,
        tolerance_reason=f"per tensor: {source}.",
        tolerance_terms={
            f"sigma[{r.variant.name}]": max((t.sigma for t in r.tensors), default=0.0)
            for r in runs
        },
        location=location if failing else None,
        tensors=results,
        notes=out_notes,
        **common,
    )


def _times(t: TensorVerdict) -> str:
    return f"{t.ratio:.3g}x" if math.isfinite(t.ratio) else "infinitely more than"


def _rel(t: TensorVerdict) -> str:
    return f"{t.error / t.reference_norm:.2e}" if t.reference_norm > 0 else "n/a"
