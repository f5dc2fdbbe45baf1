"""The variants property: a model's gradients are the same, within the precision of
the variant, when the training step runs compiled, under autocast or on another
device as in plain eager execution. :func:`gradcheck.check_devices` is its
device-only form (:mod:`gradcheck.properties.devices`): one engine, one report.

A variant is a ``+``-joined combination of at most one of each:

* ``"compile"``: ``torch.compile(loss_fn)`` with the default backend (the whole
  loss function is compiled, as a compiled training step would be);
* ``"autocast:bfloat16"`` / ``"autocast:float16"``: ``torch.autocast`` on the
  variant's device type;
* a device, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` (TensorFlow's ``"/GPU:1"`` and the
  other spellings :func:`gradcheck.devices.normalize` knows too): the model and
  batch copied there (torch) or the model run under ``tf.device`` (TensorFlow);
* ``"xla"``: TensorFlow/Keras - the loss and its gradient in one
  ``tf.function(jit_compile=True)``. A TensorFlow model runs ``"xla"`` and devices
  only (``"compile"``/autocast are torch's: UnsupportedInputError); its reference
  is eager execution in the model's dtype (gradcheck does not cast a Keras model to
  float64), whose own rounding the tolerance then counts (x sqrt(2)).

e.g. ``"cuda+autocast:float16"``, ``"compile+autocast:bfloat16"``. A variant that
cannot run on this machine (a GPU variant without a GPU, autocast a torch build
lacks, a kernel the build lacks for it - oneDNN's float16 LSTM on a CPU raises a
RuntimeError under autocast:float16 while the eager reference ran; the error is
quoted) is *skipped*, not failed: its reason is a note of the report, and a report
whose every variant was skipped has status ``"skipped"`` (``assert_variants`` does
not raise on it; the pytest fixture skips the test). A GPU is hardware the
machine has or not, not a property of the model: the same test suite runs on a
CPU-only CI and on a GPU machine, and says which it was.

What is compared, per variant, on fresh deep copies of the model (the user's module,
``.grad``, buffers, train/eval flags and every RNG are left as they were):

* ``g_v``: every trainable parameter's gradient under the variant, at the point;
* ``r``: the reference, the eager gradient at the point on the reference device
  (the model's own; check_devices: the first device named) in float64 (model and
  floating batch tensors cast to float64) when the model is float32 or half, else
  in the model's dtype (also when the model cannot run in float64);
* the error of each tensor is ``||g_v - r||_2``.

Random numbers: before every evaluation gradcheck seeds torch's generators (the
CPU's and the device's) with ``seed`` and puts NumPy's, Python's, TensorFlow's
global and Keras' seed generators back to the state they had when the check
started, so dropout draws the same mask in every evaluation on one device. Two
devices' generators (and XLA's) draw other numbers from the same seed: when
loss_fn ran random-number ops and such a variant fails, the status is
``"nondeterministic"``, not ``"mismatch"``, and a note names the ops.

Nondeterminism: every variant is evaluated twice at the point. Two results that
differ bitwise are noted (largest relative change) and diagnosed: two more
evaluations with the framework's determinism switch on (torch: deterministic
algorithms in warn-only mode, whose warnings name the ops without a
deterministic implementation; TensorFlow: op determinism, whose errors name the
op; both restored) tell kernels from state that changes between calls, and ops
with nondeterministic GPU kernels that ran are listed. A nondeterministic variant
that fails is ``"nondeterministic"``; a deterministic disagreement elsewhere
outranks it in the report's status.

Tolerance, measured at check time (no table): the rounding noise of the variant's
precision on this model and batch. The variant *without compile* (same device,
same autocast) is evaluated eagerly at the point, ``e_0``, and at ``SPREAD_POINTS``
points moved by about one unit in the last place of the variant's precision
``d`` (the autocast dtype, TF32 where it is in play, else the model's), ``e_k``:
every floating parameter and batch tensor ``x`` becomes ``x (1 + eps u)``, u
uniform in [-1, 1], eps = max(eps_d, the ulp of x's own dtype). Each such
evaluation rounds differently - the autocast casts of the weights move by an ulp,
every intermediate rounds the other way about half the time - so
``||e_k - e_0|| / sqrt(2)`` samples the size of one evaluation's rounding error in
this tensor, as the model's conditioning amplifies it (the part of the move the
true gradient makes, Hessian x eps_d, only adds to it: conservative). A bias
that a variant adds consistently (a wrong backward under autocast, a kernel wrong
on one device) is the same in ``e_k`` and ``e_0`` and cancels: the spread does not
grow with the bug it is to catch.

Three roundings the moved points share are measured per tensor as well:

* the rounding of the computation itself, at a finer precision: the spread
  ``omega_t`` of eager evaluations in the model's own precision (float32,
  beside the float64 reference; no autocast) at the point and at
  ``SPREAD_POINTS`` points moved by an ulp of that precision, scaled by
  ``rho = eps_d / eps_own`` (at least 1): what the same operations' rounding
  does to this tensor, also where an ulp of ``d`` moves every evaluation alike
  (on a generated model a bias whose true gradient is 0 came out 2e-6 under a
  correct bfloat16 autocast in every evaluation, moved or not: spread 0; a
  tensor far smaller than the intermediates it is rounded through). A spread,
  so a bug the model's own precision shares (a float32 kernel wrong) cancels
  out of it too. check_distributed scales its float32 spread by eps_d / eps_32
  the same way. Earlier versions had one ulp of ``d`` at the scale of the
  *whole* gradient instead, which hid a 30% error in a layer holding 0.3% of
  the gradient's norm, under bfloat16 and float16 alike; this term follows
  each tensor's own rounding;
* the rounding of sums whose terms cancel (torch, beside the float64
  reference): ``m``, the float64 backward with every cotangent replaced, node
  by node, by its absolute value times a random sign, is the size of the terms
  each gradient sums with none of their cancellation; one ulp of ``d`` of it,
  ``eps_t ||m_t||``, is what rounding those terms in ``d`` can leave. A
  generated model's L1 activity penalty sent +-c cotangents into a bias that
  cancel exactly, beside a head weighted 1e-6 whose share bfloat16 absorbed
  into the c's: the bias came out 0 instead of -1.4e-6 in every evaluation
  (32x the tolerance without this term). For a tensor whose terms do not
  cancel, ``||m_t||`` is about ``||r_t||``: no allowance beyond its own ulp;
* float16's range (float16 variants only): values below 6.1e-5 lose bits and
  flush to zero, the same in every evaluation. The eager variant is evaluated
  once more with the loss scaled by ``RANGE_SCALE`` = 2^16 (GradScaler's
  scale; divided by 16 while that overflows), which rounds every other value
  exactly as at the point: ``range_t = ||e_scaled - e_0||`` is what the range
  lost. A tensor that passes only thanks to it gets a note (its gradient
  underflows: train with GradScaler or bfloat16).

Per tensor::

    sigma_t     = sqrt(mean_k ||e_k - e_0||^2 / 2)
    tolerance_t = ROUNDING_SIGMAS * sqrt(sigma_t^2 + (eps_t ||r_t||)^2
                                         + (rho omega_t)^2 + (eps_t ||m_t||)^2
                                         + range_t^2)

(eps_t = max(eps_d, eps of the tensor's dtype): one ulp of the tensor, so that
a tensor whose rounding happened to cancel does not get a zero tolerance). With
a 10% (bfloat16) or 1% (float16) error planted in a layer holding 0.3% of the
gradient's norm, the check fails at 1.7-2.0x and 1.4-1.6x the tolerance (a 30%
error passed at 0.02x and 0.2x with the whole-gradient ulp;
tests/test_variants.py). A tensor fails when its error exceeds its tolerance,
or when it is NaN/Inf under the variant and finite in the reference (float16
overflow: a note says so), or connected to the loss in one and not the other. The verdict names the variant (notes) and the tensor
(``location``); ``report.tensors`` holds one entry per (variant, tensor), named
``"<variant>/<tensor>"``, whose ``device`` is where the variant ran.

TF32 (Ampere and newer GPUs round float32 matmul/convolution operands to a 10-bit
mantissa; TensorFlow's default, torch's for cuDNN convolutions): a float32
variant on a GPU where TF32 is in play and TF32 kernels ran (counted by the op
log) has precision ``"tf32"`` (eps 2^-10): its spread is measured at points moved
by a TF32 ulp, so it holds TF32's rounding as this model amplifies it. TF32 is
never a silent excuse: such a variant is measured once more with TF32 switched
off (and back on), at float32's precision. If it fails there too, TF32 is not the
cause (mismatch, said so); if only the TF32 run fails, TF32 is the cause
(mismatch naming TF32 and the switch that turns it off); if both pass, it passes
with a note.

Cost: ``report.cost["seconds"]`` is the time of the check without compilation,
``report.cost["compile_seconds"]`` the compile time (first compiled call minus the
second), per variant too (``"compile_seconds[<variant>]"``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gradcheck import devices as dv
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
    "TF32_EPS",
    "Variant",
    "assert_variants",
    "check_variants",
    "evaluate",
    "front_door",
    "judge_tensor",
    "parse_variant",
    "raise_on_failure",
    "run",
]

PROPERTY = "variants"

#: What ``variants=None`` checks for a torch model (GPU ones are skipped without a
#: GPU).
DEFAULT_VARIANTS = ("compile", "autocast:bfloat16", "autocast:float16", "cuda")

#: Moved points whose spread measures the variant's rounding.
SPREAD_POINTS = 2

AUTOCAST_DTYPES = ("bfloat16", "float16")

#: TF32 keeps 10 explicit mantissa bits: machine epsilon 2^-10 (as bfloat16's
#: 2^-7 for its 7 bits).
TF32_EPS = 2.0**-10

#: TF32 kernels assumed when the op log could not count them (a compiled graph).
DEFAULT_TF32_KERNELS = 16


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


def _is_device(token: str) -> bool:
    try:
        dv._parse(token)
    except InvalidArgumentError:
        return False
    return True


def parse_variant(text: Any) -> Variant:
    """``"cuda+autocast:float16"`` -> Variant(device="cuda", autocast="float16")."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(
            f"a variant is a non-empty string such as 'compile' or "
            f"'cuda+autocast:float16'; got {text!r}."
        )
    fields: dict[str, Any] = {}
    for raw in text.split("+"):
        token = raw.strip()
        low = token.lower()
        if low == "compile":
            key, value = "compiled", True
        elif low == "xla":
            key, value = "xla", True
        elif low.startswith("autocast"):
            dtype = low.partition(":")[2] or "bfloat16"
            dtype = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(
                dtype, dtype
            )
            if dtype not in AUTOCAST_DTYPES:
                raise InvalidArgumentError(
                    f"variant {text!r}: autocast dtype {dtype!r}; expected one of "
                    f"{list(AUTOCAST_DTYPES)}."
                )
            key, value = "autocast", dtype
        elif _is_device(token):
            key, value = "device", token
        else:
            raise InvalidArgumentError(
                f"variant {text!r}: unknown part {raw!r}. Parts: 'compile', "
                "'autocast:bfloat16', 'autocast:float16', 'xla', 'cpu', 'cuda', "
                "'cuda:<index>' (or TensorFlow's '/GPU:<index>'), joined with '+'."
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
    #: the tensor's rounding spread in the model's own precision, scaled to the
    #: variant's: rho x omega_t (module docstring)
    inherited: float = 0.0
    #: one ulp of d of the size of the terms the tensor's gradient sums
    terms: float = 0.0
    #: what the precision's range lost (float16 underflow): ||e_scaled - e_0||
    range_loss: float = 0.0
    #: within tolerance only thanks to range_loss: the gradient underflows
    underflow: bool = False

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
    own_base: np.ndarray | None = None,
    own_moved: Sequence[np.ndarray | None] = (),
    own_ratio: float = 0.0,
    rescaled: Sequence[np.ndarray | None] = (),
    magnitude: np.ndarray | None = None,
) -> TensorVerdict:
    """One tensor (pure NumPy; None = not connected to the loss, compared as
    zeros): the variant's error against the reference and the tolerance from the
    variant's rounding measured on this tensor (module docstring).

    ``moved``: the eager variant at points moved by an ulp, around ``base`` (the
    eager variant at the point): their spread. ``reference_rounds``: the
    reference is in the variant's precision (no float64 reference), so the
    difference carries two evaluations' rounding. ``own``: the point evaluated
    eagerly in the model's own precision; ``own_ratio`` (eps_d / eps_own, 0: not
    measured) scales its error against the float64 reference to the variant's
    precision. ``rescaled``: none, or the eager variant with the loss scaled by
    a power of two (divided back): its difference from ``base`` is what the
    precision's range lost (float16 underflow). ``magnitude``: the size of the
    terms this tensor's gradient sums (the float64 backward with every
    cotangent made |g| x random sign): one ulp ``eps`` of it is the rounding
    of that sum in the variant's precision, whatever cancels in it."""
    arrays = [a for a in (reference, variant, base, *moved, *rescaled) if a is not None]
    if not arrays:  # reached by the loss in no execution: they agree
        return TensorVerdict(name, (), 0.0, 0.0, 0.0, 0.0, 0.0, None, None, None, True)
    shape = arrays[0].shape

    def full(a: np.ndarray | None) -> np.ndarray:
        return np.zeros(shape) if a is None else np.asarray(a, dtype=np.float64)

    def finite_part(a: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(a), a, 0.0)

    r, g, b = full(reference), full(variant), full(base)
    if r.shape != g.shape:
        raise InvalidArgumentError(
            f"'{name}' has shape {r.shape} in the reference and {g.shape} under the "
            "variant."
        )
    finite = np.isfinite(g)
    nonfinite = int(np.sum(~finite & np.isfinite(r)))
    diff = np.where(finite, g - r, 0.0)
    el_sigma = _spread([finite_part(full(m) - b) for m in moved], shape)
    # the same computation's rounding in the model's own precision, scaled to
    # the variant's: where an ulp of d moves nothing (a sum that cancels, a
    # tensor far smaller than the intermediates it is rounded through), an ulp
    # of the finer precision still does. A spread, like sigma: a bug the model's
    # own precision shares (a float32 kernel wrong) cancels out of it
    el_own = (
        own_ratio * _spread([finite_part(full(m) - full(own_base)) for m in own_moved])
        if own_ratio and own_moved
        else 0.0
    )
    # float16's range: a scaled loss rounds every value the same way but keeps
    # the small ones above the underflow threshold (GradScaler's trick)
    el_range = (
        np.sqrt(sum(finite_part(full(m) - b) ** 2 for m in rescaled) / len(rescaled))
        if rescaled
        else 0.0
    )
    el_terms = eps * np.abs(finite_part(full(magnitude)))
    sigma = float(np.linalg.norm(el_sigma))
    terms = float(np.linalg.norm(el_terms))
    inherited = float(np.linalg.norm(el_own))
    range_loss = float(np.linalg.norm(el_range))
    r_norm = float(np.linalg.norm(finite_part(r)))
    # a reference in the variant's own precision carries a rounding of its own
    both = 2.0 if reference_rounds else 1.0
    rounding = both * sigma**2 + (eps * r_norm) ** 2 + inherited**2 + terms**2
    tol = tl.ROUNDING_SIGMAS * math.sqrt(rounding + range_loss**2)
    error = float(np.linalg.norm(diff))
    connected = (reference is not None) == (variant is not None)
    if not connected and error == 0.0:
        error = 0.0  # both zero-valued: one side just did not build the edge
        connected = True
    underflow = tl.ROUNDING_SIGMAS * math.sqrt(rounding) < error <= tol
    # the element that stands out most against its own rounding
    el_tol = el_sigma + eps * np.abs(r) + el_own + el_range + el_terms + 1e-300
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
        inherited=inherited,
        terms=terms,
        range_loss=range_loss,
        underflow=underflow,
    )


def _spread(samples: Sequence[np.ndarray], shape: Any = ()) -> np.ndarray:
    """Per element, sqrt(mean_k s_k^2 / 2): one evaluation's rounding from the
    differences ``s_k`` between two evaluations (zeros when there are none)."""
    if not samples:
        return np.zeros(shape)
    return np.sqrt(sum(s * s for s in samples) / (2 * len(samples)))


@dataclass
class VariantRun:
    """What was measured for one variant (the pipeline fills it; tests may too)."""

    variant: Variant
    #: the precision the variant computes in: the autocast dtype, "tf32", or the
    #: model's dtype
    precision: str
    device: str
    tensors: list[TensorVerdict]
    seconds: float = 0.0
    compile_seconds: float = 0.0
    evaluations: int = 0
    #: random-number ops the eager evaluation ran
    random_ops: list[str] = field(default_factory=list)
    #: loss_fn drew random numbers and this variant draws from another generator
    #: than the reference (another device, XLA): the two cannot agree
    random_differs: bool = False
    #: a second evaluation at the point differed bitwise (by repeat_change,
    #: relative)
    repeat_differs: bool = False
    repeat_change: float = 0.0
    #: ops with nondeterministic GPU kernels that ran
    candidate_ops: list[str] = field(default_factory=list)
    #: ops the determinism switch names as having no deterministic implementation
    flagged_ops: list[str] = field(default_factory=list)
    #: with the determinism switch on, two runs agreed (None: not tried)
    deterministic_agrees: bool | None = None
    switch: str = "the framework's determinism switch"
    #: devices.tf32_state of a GPU device ({} on the CPU or under autocast)
    tf32: dict[str, Any] = field(default_factory=dict)
    #: TF32 kernel calls in one evaluation (0: TF32 played no part)
    tf32_kernels: int = 0
    #: the same variant measured with TF32 switched off (TF32 runs only)
    without_tf32: VariantRun | None = None

    @property
    def worst(self) -> TensorVerdict:
        return max(self.tensors, key=lambda t: (t.ratio, t.error))

    @property
    def passed(self) -> bool:
        """Every tensor within its tolerance, in this measurement."""
        return all(t.ratio <= 1.0 and t.connected for t in self.tensors)

    @property
    def failed(self) -> bool:
        """The verdict: with TF32 in play, both measurements must pass (TF32 is
        never a silent excuse, nor the sole judge)."""
        off = self.without_tf32
        return not self.passed or (off is not None and not off.passed)

    @property
    def shown(self) -> VariantRun:
        """The measurement the report shows: the TF32-free one when it proves the
        gradients differ in full float32 already."""
        off = self.without_tf32
        return off if off is not None and not off.passed else self

    @property
    def status(self) -> str:
        if not self.failed:
            return "passed"
        noisy = self.repeat_differs or self.random_differs
        return "nondeterministic" if noisy else "mismatch"


@dataclass
class _Reference:
    grads: dict[str, Any]
    dtype: str
    device: str
    note: str | None
    #: beside a float64 reference: the point and SPREAD_POINTS points moved by
    #: an ulp of the model's own precision (``own_dtype``; None: the reference
    #: is in the model's precision itself), evaluated eagerly in it, whose
    #: spread is that precision's rounding of each tensor (:func:`_own`: on the
    #: first variant that runs, so a check whose every variant is skipped
    #: spends only the reference)
    own: dict[str, Any] | None = None
    own_moved: list[dict[str, Any]] = field(default_factory=list)
    own_dtype: str | None = None
    #: the float64 backward with every cotangent made |g| x random sign: the
    #: size of the terms each gradient sums (torch; None: not measured)
    magnitude: dict[str, Any] | None = None


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
    repro_dir: Any = None,
) -> CheckReport:
    """Check that ``model``'s gradients under each variant (``"compile"``,
    ``"autocast:bfloat16"``, ``"autocast:float16"``, ``"cuda"``, ``"cuda:1"`` and
    ``+``-combinations such as ``"cuda+autocast:float16"``; ``"xla"`` and devices
    for TensorFlow/Keras) agree with eager execution, within the variant's
    measured rounding (see the module docstring).

    ``loss_fn(model, batch)`` returns the scalar loss and must use the model and
    batch it is given (gradcheck passes copies). ``seed`` seeds torch's generators
    before every evaluation (dropout draws the same) and the moved points;
    ``rtol``, when given, replaces the measured tolerance: a tensor fails when
    ``||g_v - r|| > rtol * ||r||``. Variants that cannot run here are skipped with
    a note. Returns a report with property ``"variants"``.

    ``repro_dir``: a failing check writes a repro bundle there
    (:func:`gradcheck.repro.write_variants_bundle`; ``gradcheck replay`` reruns
    it). Default: the pytest plugin's ``--gradcheck-repro-dir``, else none."""
    return front_door(
        "check_variants",
        lambda s: run(loss_fn, model, batch, variants=variants, seed=s, rtol=rtol),
        loss_fn,
        model,
        batch,
        request=variants,
        seed=seed,
        rtol=rtol,
        label=label,
        repro_dir=repro_dir,
    )


def assert_variants(
    loss_fn: Callable[[Any, Any], Any], model: Any, batch: Any, **kwargs: Any
) -> CheckReport:
    """Like :func:`check_variants`; raises :class:`GradientMismatchError` on failure
    (not when every variant was skipped: status ``"skipped"``)."""
    return raise_on_failure(check_variants(loss_fn, model, batch, **kwargs))


def front_door(
    entry: str,
    engine: Callable[[int], CheckReport],
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    batch: Any,
    *,
    request: Any,
    seed: int | None,
    rtol: float | None,
    label: str | None,
    repro_dir: Any,
) -> CheckReport:
    """What check_variants and check_devices (``entry``) do around their engine
    (``engine(seed) -> report``): resolve the seed, label the report, write a
    repro bundle when it failed (``request``: the variants or devices as
    given), publish it to the listeners."""
    from gradcheck import api, repro

    s = api._seed(seed)
    report = engine(s)
    report.label = label
    repro.write_variants_bundle(
        repro_dir,
        report,
        entry,
        loss_fn,
        model,
        batch,
        request=request,
        seed=s,
        rtol=rtol,
    )
    return api._publish(report, label)


def raise_on_failure(report: CheckReport) -> CheckReport:
    """assert_variants / assert_devices: GradientMismatchError unless the report
    passed or was skipped (nothing could run here)."""
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
    wanted = _variants(variants)  # bad names fail before anything runs
    return evaluate(loss_fn, model, batch, wanted, seed=seed, rtol=rtol)


def evaluate(
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    batch: Any,
    wanted: Sequence[Variant] | Callable[[Any], tuple[Sequence[Variant], str]],
    *,
    seed: int = 0,
    rtol: float | None = None,
    reference_device: str | None = None,
    prop: str = PROPERTY,
    noun: str = "variant",
    describe: Callable[[str], str] | None = None,
) -> CheckReport:
    """The one engine of check_variants and check_devices: ``wanted`` against the
    eager reference on ``reference_device`` (None: the model's own device).
    ``wanted`` may be a plan, ``plan(driver) -> (variants, reference_device)``,
    for a request that needs the model's framework to be read (check_devices).
    ``prop``/``noun`` name the property and its items in the report;
    ``describe(reference_device)`` gives the report's device field."""
    started = time.perf_counter()
    if not callable(loss_fn):
        raise UnsupportedInputError(
            f"loss_fn must be callable as loss_fn(model, batch); got "
            f"{type(loss_fn).__name__}."
        )
    if rtol is not None:
        tl.gradient_rounding("float64", rtol)  # validates
    driver = variant_driver(loss_fn, model, batch)
    try:
        if callable(wanted):
            wanted, reference_device = wanted(driver)
        for v in wanted:
            driver.supported(v)
        home = dv.canonical(driver.framework, reference_device or driver.home)
        precision = driver.precision()
        common = dict(
            property=prop,
            framework=driver.framework,
            device=describe(home) if describe else home,
            dtype=precision,
            seed=seed,
        )
        why = driver.unavailable(Variant(home, device=home))
        if why is not None:  # nothing can be compared without the reference
            head = f"SKIPPED: the reference device {home} cannot run here: {why}"
            return _skipped(common, head, [], None)
        ref = _reference(driver, home, seed)
        runs: list[VariantRun] = []
        skipped: list[str] = []
        for v in wanted:
            why = driver.unavailable(v)
            if why is not None:
                skipped.append(f"{noun} '{v.name}' skipped: {why}")
                continue
            try:
                runs.append(_measure(driver, v, ref, precision, seed, rtol))
            except RuntimeError as exc:
                # the eager reference ran: the framework has no kernel for this
                # way of running the model here (oneDNN's LSTM under float16
                # autocast on a CPU; a compiler that cannot build): a variant
                # this machine cannot run, skipped like a missing GPU, its
                # error quoted (a GradcheckError is no RuntimeError: raised)
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                skipped.append(
                    f"{noun} '{v.name}' skipped: loss_fn raised under it although "
                    f"the eager reference ran ({type(exc).__name__}: {first}); "
                    "this framework build cannot run the model that way here."
                )
        compile_total = sum(r.compile_seconds for r in runs)
        cost = {
            "forward": float(driver.evaluations),
            "backward": float(driver.evaluations),
            "seconds": max(0.0, time.perf_counter() - started - compile_total),
            "compile_seconds": compile_total,
        }
        for r in runs:
            if r.variant.compiled or r.variant.xla:
                cost[f"compile_seconds[{r.variant.name}]"] = r.compile_seconds
        if not runs:
            head = (
                f"SKIPPED: no {noun} to compare with {home} can run on this machine."
                if reference_device is not None
                else f"SKIPPED: no requested {noun} can run on this machine."
            )
            return _skipped(common, head, skipped, ref, cost)
        return _report(common, runs, skipped, ref, noun=noun, rtol=rtol, cost=cost)
    finally:
        driver.restore()


# ====================================================================== measuring
def _reference(driver: Any, device: str, seed: int) -> _Reference:
    precision = driver.precision()
    note = None
    if precision != "float64" and not driver.reference_float64:
        note = (
            f"the reference is eager {precision}: gradcheck does not cast a "
            f"{driver.framework} model to float64; its rounding is counted in the "
            "tolerance."
        )
    elif precision != "float64":
        try:
            ev = driver.gradients(device=device, float64=True, seed=seed)
            _validate(ev, "float64")
            return _Reference(ev["grads"], "float64", device, None, own_dtype=precision)
        except (NonFiniteError, UnsupportedInputError):
            raise
        except Exception as exc:  # the model does not run in float64
            note = (
                f"the reference is eager {precision}: the model does not run in "
                f"float64 ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:120]})."
            )
    ev = driver.gradients(device=device, seed=seed)
    _validate(ev, precision)
    return _Reference(ev["grads"], precision, device, note)


def _validate(ev: Mapping[str, Any], dtype: str) -> None:
    if not math.isfinite(ev["loss"]):
        raise NonFiniteError(
            f"loss_fn returned {ev['loss']} in eager {dtype}: a loss must be finite "
            "to have a gradient: look for log(0), 0/0 or overflow."
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
                f"the eager {dtype} gradient of '{name}' has "
                f"{int((~np.isfinite(g)).sum())} NaN/Inf elements of {g.size} while "
                "the loss is finite: the backward pass overflows or divides by zero."
            )


def _eps(dtype: str) -> float:
    return TF32_EPS if dtype == "tf32" else tl.eps(dtype)


def _measure(
    driver: Any,
    v: Variant,
    ref: _Reference,
    precision: str,
    seed: int,
    rtol: float | None,
) -> VariantRun:
    before = driver.evaluations
    started = time.perf_counter()
    device = dv.canonical(driver.framework, v.device or driver.home)
    kw: dict[str, Any] = {"device": device, "autocast": v.autocast, "seed": seed}
    point = driver.gradients(compiled=v.compiled, xla=v.xla, repeat=True, **kw)
    base = driver.gradients(**kw) if (v.compiled or v.xla) else point
    log = base["log"]
    # TF32 rounds float32 kernels on a capable GPU; under autocast the matmuls run
    # in half precision, whose own rounding is larger
    state = (
        driver.tf32_state(device) if dv.known_gpu(device) and v.autocast is None else {}
    )
    kernels = (
        log.tf32_kernels(state, DEFAULT_TF32_KERNELS)
        if state and log is not None and "float32" in driver.dtypes.values()
        else 0
    )
    dtype = "tf32" if kernels else (v.autocast or precision)
    run = VariantRun(
        variant=v,
        precision=dtype,
        device=device,
        tensors=_judge(driver, kw, dtype, point, base, ref, seed, rtol, tf32=True),
        random_ops=sorted(log.random) if log is not None else [],
        repeat_differs=bool(point.get("repeat_differs")),
        repeat_change=float(point.get("repeat_change", 0.0)),
        candidate_ops=sorted(log.candidates) if log is not None else [],
        switch=driver.switch,
        tf32=state,
        tf32_kernels=kernels,
    )
    # draws from another generator than the reference's cannot agree with it
    run.random_differs = bool(run.random_ops) and (v.xla or device != ref.device)
    if kernels:
        kw0 = dict(kw, tf32=False)
        point0 = driver.gradients(compiled=v.compiled, xla=v.xla, **kw0)
        base0 = driver.gradients(**kw0) if (v.compiled or v.xla) else point0
        dtype0 = v.autocast or precision
        run.without_tf32 = replace(
            run,
            precision=dtype0,
            tensors=_judge(driver, kw0, dtype0, point0, base0, ref, seed, rtol),
            tf32_kernels=0,
            without_tf32=None,
        )
    if run.repeat_differs:
        # kernels or state that changes between calls? (module docstring)
        flagged, agrees = driver.probe(compiled=v.compiled, xla=v.xla, **kw)
        run.flagged_ops, run.deterministic_agrees = flagged, agrees
    run.compile_seconds = point["compile_seconds"]
    run.seconds = time.perf_counter() - started - run.compile_seconds
    run.evaluations = driver.evaluations - before
    return run


def _judge(
    driver: Any,
    kw: Mapping[str, Any],
    dtype: str,
    point: Mapping[str, Any],
    base: Mapping[str, Any],
    ref: _Reference,
    seed: int,
    rtol: float | None,
    tf32: bool = False,
) -> list[TensorVerdict]:
    """Every tensor of one measurement: the spread at SPREAD_POINTS points moved by
    an ulp of ``dtype``, then judge_tensor against the reference."""
    eps = _eps(dtype)
    moved = [
        driver.gradients(perturb=(seed * 1000 + k + 1, eps), **kw)["grads"]
        for k in range(SPREAD_POINTS)
    ]
    # the reference point's rounding in the model's own precision, scaled to d:
    # eps_d / eps_own (check_distributed scales its float32 spread the same way)
    _own(driver, ref, seed)
    own_ratio = max(1.0, eps / tl.eps(ref.own_dtype)) if ref.own_dtype else 0.0
    rescaled = _rescaled(driver, kw, dtype, base)
    tensors = []
    for name in driver.names:
        t = judge_tensor(
            name,
            ref.grads[name],
            point["grads"][name],
            base["grads"][name],
            [m[name] for m in moved],
            max(eps, tl.eps(driver.dtypes[name])),
            reference_rounds=ref.dtype == dtype,
            own_base=ref.own[name] if ref.own is not None else None,
            own_moved=[m[name] for m in ref.own_moved],
            own_ratio=own_ratio,
            rescaled=[rescaled[name]] if rescaled is not None else [],
            magnitude=ref.magnitude[name] if ref.magnitude is not None else None,
        )
        if rtol is not None:
            t.tolerance = rtol * t.reference_norm
        tensors.append(t)
    return tensors


def _own(driver: Any, ref: _Reference, seed: int) -> None:
    """Fill ``ref.own``/``ref.own_moved`` (once; nothing without a float64
    reference): the eager point and SPREAD_POINTS points moved by an ulp of the
    model's precision, evaluated in it on the reference device."""
    if ref.own_dtype is None or ref.own is not None:
        return
    kw = {"device": ref.device, "seed": seed}
    ref.own = driver.gradients(**kw)["grads"]
    eps = tl.eps(ref.own_dtype)
    ref.own_moved = [
        driver.gradients(perturb=(seed * 1000 + 500 + k, eps), **kw)["grads"]
        for k in range(SPREAD_POINTS)
    ]
    # (a float64 reference is torch's: so is this measurement). A backward that
    # cannot take the rewritten cotangents (a custom Function checking their
    # sign) only loses this term: the check still runs, with less allowance
    try:
        ref.magnitude = driver.gradients(float64=True, magnitude=True, **kw)["grads"]
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        ref.note = (ref.note + " " if ref.note else "") + (
            "the size of the terms each gradient sums could not be measured (the "
            f"backward refused |g| x random-sign cotangents: {type(exc).__name__}: "
            f"{first}); tensors are judged without that term."
        )


#: The loss scale of float16's range measurement: GradScaler's initial scale.
RANGE_SCALE = 2.0**16


def _rescaled(
    driver: Any, kw: Mapping[str, Any], dtype: str, base: Mapping[str, Any]
) -> dict[str, Any] | None:
    """float16 only: the eager variant's gradients with the loss scaled by a
    power of two (and divided back). Scaling by 2^k is exact, so every value
    rounds as at the point, except those float16's range flushes to zero or
    rounds to its coarse subnormals (below 6.1e-5): the difference from
    ``base`` is what the range lost, a bias the moved points share (an ulp's
    move leaves a flushed value flushed). bfloat16, TF32 and float32 have
    float32's range (no evaluation spent). The scale starts at GradScaler's and
    is divided by 2^4 while some tensor overflows where the point did not; each
    tensor keeps the largest scale at which it stayed finite (an overflow on
    its own backward path would have made it NaN/Inf), so a trunk whose
    gradients overflow at 2^16 does not cost a small head its measurement."""
    if dtype != "float16":
        return None
    out: dict[str, Any] = {}
    left = {n for n, g in base["grads"].items() if g is not None}
    scale = RANGE_SCALE
    while left and scale >= 2.0:
        grads = driver.gradients(loss_scale=scale, **kw)["grads"]
        for n in list(left):
            g, g0 = grads[n], base["grads"][n]
            if g is not None and np.isfinite(g)[np.isfinite(g0)].all():
                out[n] = g
                left.discard(n)
        scale /= 16.0
    return {n: out.get(n, base["grads"][n]) for n in base["grads"]}


# ====================================================================== the report
def _skipped(
    common: Mapping[str, Any],
    head: str,
    skipped: list[str],
    ref: _Reference | None,
    cost: Mapping[str, float] | None = None,
) -> CheckReport:
    notes = [head, *skipped]
    if ref is not None and ref.note:
        notes.append(ref.note)
    return CheckReport(
        status="skipped",
        mode="skipped",
        error=0.0,
        tolerance=0.0,
        tolerance_reason="nothing could run here; nothing was compared.",
        notes=notes,
        reference_dtype=ref.dtype if ref is not None else None,
        cost=dict(cost or {}),
        **common,
    )


def _report(
    common: Mapping[str, Any],
    runs: list[VariantRun],
    skipped: list[str],
    ref: _Reference,
    *,
    noun: str,
    rtol: float | None,
    cost: dict[str, float],
) -> CheckReport:
    results: list[TensorResult] = []
    for r in runs:
        shown = r.shown
        for t in shown.tensors:
            ok = t.connected and t.ratio <= 1.0
            results.append(
                TensorResult(
                    name=f"{r.variant.name}/{t.name}",
                    shape=t.shape,
                    dtype=shown.precision,
                    device=str(r.device),
                    kind="parameter",
                    grad_norm=t.variant_norm,
                    error=t.error,
                    tolerance=t.tolerance,
                    status="passed" if ok else r.status,
                    connected=t.connected,
                )
            )
    failing = [r for r in runs if r.failed]
    # a deterministic disagreement outranks noise
    status = "passed"
    if failing:
        status = (
            "mismatch"
            if any(r.status == "mismatch" for r in failing)
            else "nondeterministic"
        )
    pool = [r for r in failing if r.status == status] or runs
    worst_run = max(pool, key=lambda r: (r.shown.worst.ratio, r.shown.worst.error))
    worst = worst_run.shown.worst
    notes: list[str] = []
    for r in runs:
        notes.extend(_notes(r, ref, noun))
    notes.extend(skipped)
    if ref.note:
        notes.append(ref.note)
    location = None
    if failing:
        quantity = (
            f"gradient under {noun} '{worst_run.variant.name}' (analytical) vs eager "
            f"{ref.dtype} on {ref.device} (numerical), L2 over the tensor; values at "
            "its worst element"
        )
        ops = _ops(worst_run) if status == "nondeterministic" else []
        if ops:
            quantity += f" [nondeterministic op: {', '.join(ops)}]"
        location = Location(
            tensor=worst.name,
            index=worst.index,
            numerical=worst.reference_value,
            analytical=worst.variant_value,
            error=worst.error,
            tolerance=worst.tolerance,
            quantity=quantity,
        )
    terms = {
        f"sigma[{r.variant.name}]": max((t.sigma for t in r.tensors), default=0.0)
        for r in runs
    }
    for r in runs:
        if r.tf32_kernels:
            terms[f"tf32_kernels[{r.device}]"] = float(r.tf32_kernels)
    return CheckReport(
        status=status,
        mode="variants",
        error=worst.error,
        tolerance=worst.tolerance,
        tolerance_reason=f"per tensor: {_source(runs, ref, rtol)}.",
        tolerance_terms=terms,
        reference_dtype=ref.dtype,
        location=location,
        tensors=results,
        notes=notes,
        cost=cost,
        **common,
    )


def _source(runs: list[VariantRun], ref: _Reference, rtol: float | None) -> str:
    if rtol is not None:
        return f"rtol {rtol:g} x ||r_t||"
    own = ref.own is not None
    fp16 = any(r.precision == "float16" for r in runs)
    text = (
        f"{tl.ROUNDING_SIGMAS:g} x sqrt(sigma_t^2 + (eps_t ||r_t||)^2"
        + (" + (rho omega_t)^2" if own else "")
        + (" + (eps_t ||m_t||)^2" if ref.magnitude is not None else "")
        + (" + range_t^2" if fp16 else "")
        + "), sigma_t the measured rounding spread of the eager variant at "
        f"{SPREAD_POINTS} points moved by ~1 ulp of its precision d"
    )
    if own:
        text += (
            f", omega_t the same for eager {ref.own_dtype} (moved by ~1 ulp of "
            f"{ref.own_dtype}), rho = eps_d / eps_{ref.own_dtype} (at least 1)"
        )
    if ref.magnitude is not None:
        text += (
            ", m_t the size of the terms r_t sums (the float64 backward with every "
            "cotangent made |g| x a random sign)"
        )
    if fp16:
        text += (
            ", range_t what float16's range lost (the eager variant against the "
            "same with the loss scaled by a power of two)"
        )
    if any(r.precision == ref.dtype for r in runs):
        text += (
            f" (sigma_t^2 doubled where the reference, eager {ref.dtype}, rounds "
            "like the variant)"
        )
    tf32 = [r for r in runs if r.tf32_kernels]
    if tf32:
        text += (
            "; TF32 accounted for on "
            + ", ".join(
                f"{r.device} (d = tf32, eps 2^-10, {r.tf32_kernels} TF32 kernels)"
                for r in tf32
            )
            + ", and the same measured with TF32 off at float32's precision"
        )
    return text


def _notes(r: VariantRun, ref: _Reference, noun: str) -> list[str]:
    out: list[str] = []
    head = f"{noun} '{r.variant.name}' ({r.precision} on {r.device})"
    timing = f"check {r.seconds:.2f} s" + (
        f", compile {r.compile_seconds:.2f} s"
        if r.variant.compiled or r.variant.xla
        else ""
    )
    shown = r.shown
    w = shown.worst
    if not r.failed:
        out.append(
            f"{head} passed: worst '{w.name}' error {w.error:.3e} <= tolerance "
            f"{w.tolerance:.3e} ({timing})."
        )
    else:
        bad = [t for t in shown.tensors if not (t.connected and t.ratio <= 1.0)]
        word = "MISMATCH" if r.status == "mismatch" else "DIFFERS (nondeterministic)"
        text = (
            f"{head} {word} in "
            + ", ".join(f"'{t.name}'" for t in bad[:6])
            + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
            + f": worst '{w.name}' ||g_{noun} - g_eager|| = {w.error:.3e} > "
            f"tolerance {w.tolerance:.3e} ({_times(w)} the rounding measured for "
            f"{shown.precision}; relative error {_rel(w)}) ({timing})."
        )
        nonfinite = [t for t in bad if t.nonfinite]
        if nonfinite:
            text += (
                f" NaN/Inf under the {noun} where eager is finite in "
                + ", ".join(f"'{t.name}' ({t.nonfinite} elements)" for t in nonfinite)
                + (
                    ": float16 overflows above 65504 - scale the loss "
                    "(torch.amp.GradScaler) or use bfloat16."
                    if shown.precision == "float16"
                    else "."
                )
            )
        if r.random_differs:
            other = "XLA" if r.variant.xla else f"{r.device}'s generator"
            text += (
                f" loss_fn draws random numbers ({', '.join(r.random_ops)}: dropout "
                f"or noise in training mode) and {other} draws other numbers than "
                f"eager execution on {ref.device} from the same seed, so the two "
                "cannot agree: check with training=False / model.eval() or without "
                "the random layers."
            )
        unconnected = [t for t in bad if not t.connected]
        if unconnected:
            text += (
                " Connected to the loss in one execution and not the other: "
                + ", ".join(f"'{t.name}'" for t in unconnected)
                + "."
            )
        out.append(text)
    under = [t for t in shown.tensors if t.underflow and t.connected]
    if under:
        u = max(under, key=lambda t: t.error / max(t.reference_norm, 1e-300))
        out.append(
            f"{head}: "
            + ", ".join(f"'{t.name}'" for t in under[:6])
            + (f" and {len(under) - 6} more" if len(under) > 6 else "")
            + f" pass only because {shown.precision}'s range is counted: their "
            "gradients underflow (values below 6.1e-5 lose bits or flush to "
            f"zero) and differ from eager by up to {_rel(u)} relative ('{u.name}'); "
            "with the loss scaled they agree. Train with "
            "torch.amp.GradScaler (or bfloat16) so that they do not vanish."
        )
    out.extend(_tf32_notes(r))
    if r.repeat_differs:
        out.append(_nondeterminism_note(r))
    return out


def _tf32_notes(r: VariantRun) -> list[str]:
    if not r.tf32.get("gpu"):
        return []
    reason = str(r.tf32.get("reason", "")).rstrip(".")
    if not r.tf32_kernels:
        played = (
            "; this model ran no float32 matmul/convolution there, so TF32 played "
            "no part"
            if r.tf32.get("in_play")
            else ""
        )
        cause = "; TF32 is not the cause: no TF32 kernel ran" if r.failed else ""
        return [f"{r.device}: {reason}{played}{cause}."]
    off = r.without_tf32
    assert off is not None
    head = f"{r.device}: {reason} ({r.tf32_kernels} TF32 kernel calls per evaluation)"
    if not off.passed:
        return [
            f"{head}; with TF32 switched off the gradients still differ "
            f"({_times(off.worst)} the float32 tolerance): TF32 is not the cause."
        ]
    if not r.passed:
        return [
            f"{head}; TF32 is the cause: with TF32 switched off the gradients agree "
            f"within float32's rounding, with it they differ by {_times(r.worst)} "
            "TF32's measured rounding (ill-conditioned sums: large terms "
            f"cancelling). Train with TF32 off if that precision matters "
            f"({_tf32_off_hint(r)})."
        ]
    return [
        f"{head}; judged at TF32's measured rounding, and with TF32 switched off "
        "at float32's: both agree."
    ]


def _tf32_off_hint(r: VariantRun) -> str:
    if r.tf32.get("framework") == "tensorflow":
        return "tf.config.experimental.enable_tensor_float_32_execution(False)"
    return (
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'; "
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'"
    )


def _ops(r: VariantRun) -> list[str]:
    if r.flagged_ops:
        return r.flagged_ops
    if r.random_differs or r.random_ops:
        return r.random_ops
    return r.candidate_ops


def _nondeterminism_note(r: VariantRun) -> str:
    text = (
        f"{r.variant.name} is nondeterministic: two evaluations at the same point "
        f"gave different results (largest relative change {r.repeat_change:.1e}), "
        "with every random-number generator gradcheck reaches reset in between."
    )
    if r.flagged_ops:
        text += (
            f" {r.switch} names {', '.join(r.flagged_ops)} as having no "
            "deterministic implementation."
        )
    if r.deterministic_agrees:
        ran = f" ({', '.join(r.candidate_ops)} ran here)" if r.candidate_ops else ""
        text += (
            f" With {r.switch} on, the runs agree: the nondeterminism comes from "
            f"kernels it replaces with deterministic ones{ran}; turn it on to "
            "compare."
        )
    elif r.deterministic_agrees is False:
        text += (
            f" They still differ with {r.switch} on"
            + (
                f" (nondeterministic-kernel ops that ran: {', '.join(r.candidate_ops)})"
                if r.candidate_ops
                else ""
            )
            + ": look for state that changes between calls (a counter, a clock, a "
            "generator of loss_fn's own) or an op the framework does not flag."
        )
    elif r.candidate_ops:
        text += (
            " Ops with nondeterministic GPU kernels that ran: "
            + ", ".join(r.candidate_ops)
            + "."
        )
    if r.random_ops and not r.deterministic_agrees:
        text += (
            f" Random ops ran ({', '.join(r.random_ops)}): a source gradcheck cannot "
            "reset draws anew on every call (a generator of loss_fn's own; a "
            "TensorFlow op seeded from the global seed, whose op seed advances): "
            "pass an explicit seed or a generator."
        )
    return text


def _times(t: TensorVerdict) -> str:
    return f"{t.ratio:.3g}x" if math.isfinite(t.ratio) else "infinitely more than"


def _rel(t: TensorVerdict) -> str:
    return f"{t.error / t.reference_norm:.2e}" if t.reference_norm > 0 else "n/a"
