"""Any model by name: ``check_model("hf:bert")`` checks a real architecture with no
test code.

A *spec* names a model:

* ``hf:<model_type>``: transformers ``AutoConfig.for_model(model_type)``, shrunk
  (layers <= 2, hidden 32, 2 heads, vocabulary <= 1024, images <= 64, experts <= 4,
  every dropout 0, nested configs too), ``AutoModel.from_config``, random weights,
  nothing downloaded. Overrides: ``hf:llama?num_hidden_layers=1&hidden_size=64``
  (typed as the config's attribute; ``text_config.hidden_size`` for nested ones).
  ``hf:*``: every model type that takes token ids, pixel values or audio values.
* ``keras:<Application>``: ``keras.applications``, ``weights=None``, 10 classes, the
  smallest input it accepts (32x32 where allowed).
* ``package.module:callable``: called with no arguments, returns a model or
  ``(model, inputs)`` (inputs: a dict of keyword arguments, a tuple of positional
  ones, or one tensor).

The loss has two heads on the model's first floating output: ``main``, a seeded
random projection, and ``aux``, its mean square, with asymmetric weights drawn by
Hypothesis from the seed. The properties map to the library's checks: ``fd`` ->
:func:`gradcheck.check_gradients`, ``linearity`` -> :func:`gradcheck.check_linearity`,
``locality`` -> :func:`gradcheck.check_locality` (both heads must reach every
parameter the first output depends on, and nothing else).

A ``mismatch`` has its weights shrunk (:func:`shrink_weights`): Hypothesis
searches 0, 1, halves and doubles per head for the simplest weights that still
fail, in at most SHRINK_MAX_CHECKS extra checks and about the failing check's own
time, and the report gets a note such as "fails with weights main=1.0, aux=0.0
(shrunk from main=0.291, aux=0.813 in 3 checks)" with what each head alone did.

A model that cannot be built gives reports with status ``unbuildable`` and the
framework's reason; a check past ``timeout`` seconds gives ``timeout``; a check
that raises (a :class:`~gradcheck.GradcheckError`, or the framework inside the
model's forward) gives ``error`` with its message, never a traceback.

With ``timeout``, the checks run in one spawned worker process that serves model
after model (the framework is imported once), is replaced after a timeout, a
crash or ``WORKER_MODELS`` models, exits with its parent, and runs under an
address-space limit (``WORKER_MEMORY``): a model that would exhaust memory is an
``error`` ("out of memory: ..."), not a machine out of memory.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import math
import multiprocessing
import os
import pickle
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from gradcheck.errors import GradcheckError, InvalidArgumentError
from gradcheck.result import NOT_RUN, CheckReport

__all__ = [
    "DTYPES",
    "MAX_PARAMETERS",
    "PROPERTIES",
    "Checker",
    "ModelReports",
    "Shrink",
    "Spec",
    "UnbuildableError",
    "check_model",
    "draw_weights",
    "expand_specs",
    "parse_spec",
    "parse_weights",
    "shrink_weights",
]

PROPERTIES = ("fd", "linearity", "locality")
#: the report's ``property`` for each short name
PROPERTY_NAMES = {
    "fd": "finite_difference",
    "linearity": "linearity",
    "locality": "locality",
}
DTYPES = ("float32", "float64")
#: configs still larger than this after shrinking are refused, not run
MAX_PARAMETERS = 20_000_000
HEADS = ("main", "aux")


class UnbuildableError(GradcheckError):
    """The spec names a model that cannot be built here (the framework's reason)."""


class ForwardError(GradcheckError):
    """The model's own forward fails at the point to check (it raises, or its
    output is not finite) before any loss or gradient: an ``error`` report
    that says so and where, not the framework's bare exception."""


# --------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed spec: ``kind`` is "hf", "keras" or "callable"."""

    text: str
    kind: str
    name: str
    overrides: tuple[tuple[str, str], ...] = ()


def parse_spec(text: str) -> Spec:
    """Parse a spec's syntax; InvalidArgumentError says what a spec looks like."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(
            f"a model spec is a non-empty string such as 'hf:bert', "
            f"'keras:MobileNetV3Small' or 'package.module:callable'; got {text!r}."
        )
    text = text.strip()
    prefix, sep, rest = text.partition(":")
    if not sep or not prefix or not rest:
        raise InvalidArgumentError(
            f"model spec {text!r}: expected 'hf:<model_type>', 'keras:<Application>' "
            "or 'package.module:callable'."
        )
    if prefix == "hf":
        name, _, query = rest.partition("?")
        if not name:
            raise InvalidArgumentError(
                f"model spec {text!r}: no model type after 'hf:'."
            )
        try:
            pairs = urllib.parse.parse_qsl(query, strict_parsing=True) if query else []
        except ValueError:
            raise InvalidArgumentError(
                f"model spec {text!r}: overrides are key=value pairs joined by '&', "
                "e.g. hf:llama?num_hidden_layers=1&hidden_size=64."
            ) from None
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise InvalidArgumentError(f"model spec {text!r}: {dup} given twice.")
        if name == "*" and pairs:
            raise InvalidArgumentError(
                f"model spec {text!r}: 'hf:*' takes no overrides."
            )
        return Spec(text, "hf", name, tuple(pairs))
    if prefix == "keras":
        if "?" in rest:
            raise InvalidArgumentError(
                f"model spec {text!r}: keras applications take no overrides."
            )
        return Spec(text, "keras", rest)
    module = prefix
    if not all(part.isidentifier() for part in module.split(".")) or not all(
        part.isidentifier() for part in rest.split(".")
    ):
        raise InvalidArgumentError(
            f"model spec {text!r}: expected 'hf:<model_type>', 'keras:<Application>' "
            "or 'package.module:callable' (a module path and a function name)."
        )
    return Spec(text, "callable", f"{module}:{rest}")


def expand_specs(specs: Iterable[str]) -> list[Spec]:
    """Parse every spec and expand ``hf:*`` to the model types that take token ids,
    pixel values or audio values. Also validates hf overrides (InvalidArgumentError
    before anything runs); a model type that does not exist is left for the run to
    report as unbuildable."""
    out: list[Spec] = []
    for text in specs:
        spec = parse_spec(text)
        if spec.kind == "hf" and spec.name == "*":
            from gradcheck.backends import _hf

            out.extend(parse_spec(f"hf:{t}") for t in _hf.expand_all())
            continue
        if spec.kind == "hf" and spec.overrides:
            _validate_overrides(spec)
        out.append(spec)
    return out


def _validate_overrides(spec: Spec) -> None:
    from gradcheck.backends import _hf

    try:
        cfg = _hf.load_config(spec.name)
    except Exception:  # unknown model type: reported as unbuildable when run
        return
    _hf.shrink_config(cfg)
    _hf.apply_overrides(cfg, dict(spec.overrides), spec.text)


# --------------------------------------------------------------------- weights
def draw_weights(seed: int) -> dict[str, float]:
    """The two heads' loss weights, drawn by Hypothesis from ``seed`` (the same
    seed, the same weights): positive, at least 2x apart, rounded to 3 digits, so
    a swapped or dropped head changes the total."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    weight = st.floats(0.05, 4.0).map(lambda w: float(f"{w:.3g}"))
    pair = st.tuples(weight, weight).filter(lambda w: max(w) >= 2 * min(w))
    drawn: list[tuple[float, float]] = []

    @hseed(seed)
    @settings(
        max_examples=1,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(pair)
    def draw(w: tuple[float, float]) -> None:
        drawn.append(w)

    draw()
    return dict(zip(HEADS, drawn[-1], strict=True))


def _weights_arg(weights: Any) -> dict[str, float] | None:
    """``weights=``: None (drawn from the seed) or ``{"main": w, "aux": w}``."""
    if weights is None:
        return None
    if not isinstance(weights, Mapping) or set(weights) != set(HEADS):
        raise InvalidArgumentError(
            f"weights must be None (drawn from the seed) or a dict with the heads "
            f"{list(HEADS)}, e.g. {{'main': 1.0, 'aux': 0.0}}; got {weights!r}."
        )
    out = {}
    for head in HEADS:
        w = weights[head]
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not (math.isfinite(w))
        ):
            raise InvalidArgumentError(
                f"weights[{head!r}] must be a finite number; got {w!r}."
            )
        out[head] = float(w)
    return out


def parse_weights(text: str) -> dict[str, float]:
    """``"main=1.0,aux=0.0"`` (what a shrink note prints) as ``weights=``;
    InvalidArgumentError says what is wrong."""
    pairs: dict[str, Any] = {}
    for item in str(text).split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key.strip() in pairs:
            raise InvalidArgumentError(
                f"weights {text!r}: expected each head once as head=number, e.g. "
                "main=1.0,aux=0.0."
            )
        try:
            pairs[key.strip()] = float(value)
        except ValueError:
            raise InvalidArgumentError(
                f"weights {text!r}: {value.strip()!r} is not a number."
            ) from None
    if set(pairs) != set(HEADS):
        raise InvalidArgumentError(
            f"weights {text!r}: expected each head once as head=number: "
            + ",".join(f"{h}=W" for h in HEADS)
            + "."
        )
    out = _weights_arg(pairs)
    assert out is not None
    return out


def _fmt_weights(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={float(v)!r}" for k, v in weights.items())


#: Which failing checks have their loss weights shrunk: ``mismatch`` only. A
#: mismatch is a verdict about the gradients at these weights, and the simplest
#: weights that still give it say through which head the error shows (one head
#: at 0 and still failing: through the other head alone). Not
#: ``nondifferentiable`` (a kink in the model at the point: no weight moves it,
#: a zero weight only hides it), not ``nondeterministic`` (reruns differ by
#: themselves: a shrink would chase noise and report a set that fails by
#: chance), not ``error``/``timeout``/``unbuildable`` (no verdict to keep).
SHRINK_STATUSES = ("mismatch",)
#: A shrink runs at most this many extra checks (each check of the same
#: property at other weights, fd without its blame search) ...
SHRINK_MAX_CHECKS = 10
#: ... and starts none once it has run for max(SHRINK_MIN_SECONDS,
#: SHRINK_TIME_FACTOR x the failing check's own seconds), nor one that would
#: end past a worker's timeout: a sweep pays for failing checks only, at most
#: about twice their time, and a correct model never shrinks.
SHRINK_TIME_FACTOR = 1.0
SHRINK_MIN_SECONDS = 5.0


@dataclasses.dataclass
class Shrink:
    """The outcome of :func:`shrink_weights`: the simplest failing weights found
    (``weights``; ``start`` when nothing simpler failed), the checks run, the
    weight sets seen to pass and to fail, and why it stopped early (None:
    Hypothesis' shrinker finished)."""

    start: dict[str, float]
    weights: dict[str, float]
    checks: int
    seconds: float
    passed: list[dict[str, float]]
    failed: list[dict[str, float]] = dataclasses.field(default_factory=list)
    stopped: str | None = None

    @property
    def simpler(self) -> bool:
        return self.weights != self.start

    def note(self) -> str:
        """The sentence the report carries (its notes, the rows' message)."""
        runs = f"{self.checks} check{'s' if self.checks != 1 else ''}"
        cap = f"; stopped at {self.stopped}" if self.stopped else ""
        if not self.simpler:
            text = (
                f"fails with weights {_fmt_weights(self.weights)} (no simpler "
                f"weight set was found to fail in {runs}{cap})"
            )
        else:
            text = (
                f"fails with weights {_fmt_weights(self.weights)} (shrunk from "
                f"{_fmt_weights(self.start)} in {runs}{cap})"
            )
        zero = [k for k, v in self.weights.items() if v == 0]
        live = [k for k, v in self.weights.items() if v != 0]
        if zero and len(live) == 1:
            (head,) = live
            # what the other heads alone did, where the shrink ran it
            others = [
                (w, ok)
                for ws, ok in ((self.failed, False), (self.passed, True))
                for w in ws
                if w[head] == 0 and all(w[k] != 0 for k in zero)
            ]
            alone = (
                f"with {' and '.join(zero)} at weight 0 the '{head}' head alone fails"
            )
            if others and not others[0][1]:
                text += (
                    f"; {alone}, and so does {' and '.join(zero)} alone "
                    f"({_fmt_weights(others[0][0])}): the error shows through "
                    "every head alone (on a path they share in the model, or on "
                    "each head's)"
                )
            elif others:
                # a pass is "not caught", not "correct": a bug in the model's
                # body can be below the tolerance through one head (planted
                # BERT: aux alone passes), so no "only on main's path"
                text += (
                    f"; {alone} and {' and '.join(zero)} alone passes "
                    f"({_fmt_weights(others[0][0])}): the error shows through "
                    f"{head}'s head only (on {head}'s path; through "
                    f"{' and '.join(zero)}'s it is absent or below the tolerance)"
                )
            else:
                text += (
                    f"; {alone}: the wrong gradient is on {head}'s path (the "
                    "other head alone was not checked)"
                )
        elif not zero and len(live) > 1:
            singles = [
                next(
                    (
                        w
                        for w in self.passed
                        if w[h] != 0 and all(w[k] == 0 for k in w if k != h)
                    ),
                    None,
                )
                for h in live
            ]
            if all(singles):
                text += (
                    "; each head alone passes ("
                    + "; ".join(_fmt_weights(w) for w in singles if w)
                    + "): it fails only with the heads together (their "
                    "gradients do not add up)"
                )
        return text + "."


#: Each head's weight in a shrink comes from this ladder, simplest first (0:
#: the head switched off; 1: the head as it is; then halves and doubles), with
#: the drawn weight last. Hypothesis shrinks a ``sampled_from`` towards its
#: first entries, so its shrinker moves each weight down this ladder as far as
#: the check keeps failing. A ladder rather than ``floats()``: Hypothesis'
#: float shrinking takes many steps through values such as 2.2e-16 on the way
#: to 0, each of them a model check, and ends on numbers no simpler to read
#: than the drawn ones.
SHRINK_LADDER = (0.0, 1.0, 0.5, 2.0, 0.25, 4.0, 0.1)


def shrink_weights(
    fails: Any,
    start: Mapping[str, float],
    *,
    max_checks: int = SHRINK_MAX_CHECKS,
    seconds: float = SHRINK_MIN_SECONDS,
    deadline: float | None = None,
    estimate: float = 0.0,
) -> Shrink:
    """The simplest weight set for which ``fails(weights)`` is still True,
    given the failing ``start``, by Hypothesis' own search and shrinker
    (``hypothesis.find``: derandomized, no database, no deadline) over
    :data:`SHRINK_LADDER` per head (the start's own weight appended where it
    is not on it).

    Bounded: at most ``max_checks`` calls of ``fails`` and none started after
    ``seconds`` or (``deadline``, a ``time.monotonic()``) one that would end
    past it, judged by the slowest call so far (before the first: ``estimate``,
    the failing check's own seconds, so that a shrink never turns a verdict into
    a worker's timeout); past the bound every further
    candidate counts as passing, which ends the shrink at the simplest failure
    found so far. The start is known to fail (never rerun) and all-zero weights
    are never checked (a zero total has nothing to be wrong)."""
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis import strategies as st
    from hypothesis.errors import NoSuchExample

    names = tuple(start)
    start = {k: float(start[k]) for k in names}

    def head(name: str) -> Any:
        ladder = list(SHRINK_LADDER)
        if start[name] not in ladder:  # a weight on the ladder keeps its place
            ladder.append(start[name])
        return st.sampled_from(ladder)

    cache: dict[tuple[float, ...], bool] = {tuple(start.values()): True}
    state: dict[str, Any] = {
        "checks": 0,
        "stopped": None,
        "passed": [],
        "failed": [],
        "each": 0.0,
    }
    began = time.monotonic()

    def condition(w: Mapping[str, float]) -> bool:
        key = tuple(w[k] for k in names)
        if key in cache:
            return cache[key]
        if all(v == 0 for v in key):
            return False
        now = time.monotonic()
        if state["checks"] >= max_checks:
            state["stopped"] = state["stopped"] or f"its cap of {max_checks} checks"
            return False
        if now - began >= seconds:
            state["stopped"] = state["stopped"] or f"its time limit ({seconds:.0f} s)"
            return False
        each = state["each"] if state["checks"] else estimate
        if deadline is not None and now + each > deadline:
            state["stopped"] = state["stopped"] or "the check's timeout"
            return False
        w = {k: float(w[k]) for k in names}  # the heads in their order
        result = bool(fails(dict(w)))
        state["each"] = max(state["each"], time.monotonic() - now)
        state["checks"] += 1
        cache[key] = result
        state["passed" if not result else "failed"].append(dict(w))
        return result

    strategy = st.fixed_dictionaries({k: head(k) for k in names})
    found: Mapping[str, float] = start
    with contextlib.suppress(NoSuchExample):  # nothing else failed: the start
        found = find(
            strategy,
            condition,
            settings=settings(
                max_examples=4 * max_checks,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
                verbosity=Verbosity.quiet,
                report_multiple_bugs=False,
            ),
        )
    return Shrink(
        start=start,
        weights={k: float(found[k]) for k in names},
        checks=state["checks"],
        seconds=time.monotonic() - began,
        passed=state["passed"],
        failed=state["failed"],
        stopped=state["stopped"],
    )


# --------------------------------------------------------------------- results
class ModelReports(list):
    """The reports of one :func:`check_model` call (a list of
    :class:`~gradcheck.CheckReport`, one per property x dtype), with the rows the
    CLI and the reports show."""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self)

    @property
    def mismatches(self) -> list[CheckReport]:
        return [r for r in self if r.status == "mismatch"]

    def rows(self) -> list[dict[str, Any]]:
        return [row(r) for r in self]


def row(report: CheckReport) -> dict[str, Any]:
    """``model, property, dtype, status, seconds, parameters, message`` of a report
    that :func:`check_model` made."""
    meta = _meta(report)
    message = report.notes[0] if report.status in NOT_RUN else report.message()
    return {
        "model": meta.get("model", report.label),
        "property": meta.get("property", report.property),
        # the dtype asked for (the sweep table's column), not the report's own:
        # "mixed(float32,float64)" where the model keeps some parameters in
        # float32 (its note names them)
        "dtype": meta.get("dtype", report.dtype),
        "status": report.status,
        "seconds": round(float(report.cost.get("seconds", 0.0)), 3),
        "parameters": int(report.cost.get("parameters", 0)),
        "message": message,
    }


def _label(model: str, prop: str, dtype: str) -> str:
    return f"{model} {prop} {dtype}"


def _meta(report: CheckReport) -> dict[str, str]:
    parts = (report.label or "").rsplit(" ", 2)
    if len(parts) == 3 and parts[1] in PROPERTIES:
        meta = {"model": parts[0], "property": parts[1]}
        if parts[2] in DTYPES:
            meta["dtype"] = parts[2]
        return meta
    return {}


def not_run_report(
    status: str,
    model: str,
    prop: str,
    dtype: str,
    reason: str,
    *,
    seed: int = 0,
    framework: str = "unknown",
    parameters: int = 0,
    seconds: float = 0.0,
) -> CheckReport:
    """A report for a check that reached no verdict (``unbuildable``, ``timeout``,
    ``error``): the reason is its first note."""
    report = CheckReport(
        property=PROPERTY_NAMES[prop],
        status=status,
        framework=framework,
        device="cpu",
        dtype=dtype,
        seed=seed,
        mode="none",
        error=math.nan,
        tolerance=math.nan,
        tolerance_reason="not run",
        notes=[reason],
        cost={"seconds": seconds, "parameters": parameters},
    )
    report.label = _label(model, prop, dtype)
    return report


def _reason(exc: BaseException, memory: int | None = None) -> str:
    text = str(exc).strip()
    if isinstance(exc, GradcheckError):
        return text or type(exc).__name__
    first = text.splitlines()[0] if text else ""
    if len(first) > 400:  # transformers lists every model type it knows
        first = first[:400].rsplit(" ", 1)[0] + " ..."
    reason = f"{type(exc).__name__}: {first}"
    return _oom_note(reason, memory) if memory else reason


# --------------------------------------------------------------------- targets
class Checker:
    """One model, built once (lazily), checked per property and dtype.

    ``model``: a spec string / :class:`Spec`, or a model object (torch
    ``nn.Module`` or Keras model) with ``inputs``."""

    def __init__(
        self,
        model: Any,
        inputs: Any = None,
        *,
        seed: int = 0,
        max_parameters: int = MAX_PARAMETERS,
        weights: Mapping[str, float] | None = None,
        shrink: bool = True,
        time_limit: float | None = None,
    ) -> None:
        self.seed = seed
        self.max_parameters = max_parameters
        #: shrink a failing check's loss weights (see shrink_weights)
        self.shrink = shrink
        #: the seconds each check may take (a worker's timeout): a shrink
        #: starts no check that would end past it
        self.time_limit = time_limit
        if isinstance(model, str):
            model = parse_spec(model)
        self.spec = model if isinstance(model, Spec) else None
        self.object = None if self.spec is not None else model
        self.name = self.spec.text if self.spec else _object_name(model)
        self.user_inputs = inputs
        self.parameters = 0
        self.framework = "unknown"
        self.build_seconds = 0.0
        self._built: tuple[Any, Any] | None = None
        self._failure: str | None = None
        self._weights: dict[str, float] | None = _weights_arg(weights)
        #: the model's own error asking for train mode, once a check met it
        self._train: str | None = None

    # ---------------------------------------------------------------- build
    def build(self) -> None:
        """Build the model and its inputs; UnbuildableError with the reason.
        InvalidArgumentError (a bad override) passes through."""
        if self._built is not None:
            return
        if self._failure is not None:
            raise UnbuildableError(self._failure)
        started = time.perf_counter()
        try:
            model, inputs = self._make()
        except InvalidArgumentError:
            raise
        except GradcheckError as exc:
            self._failure = str(exc)
            raise UnbuildableError(self._failure) from exc
        except Exception as exc:  # the framework's reason, never a traceback
            self._failure = _reason(exc)
            raise UnbuildableError(self._failure) from exc
        finally:
            self.build_seconds = time.perf_counter() - started
        if self.user_inputs is not None:
            inputs = self.user_inputs
        self.framework = _framework(model)
        if self.framework == "unknown":
            self._failure = (
                f"{self.name} gave a {type(model).__name__}, not a torch nn.Module "
                "or a Keras model"
            )
            raise UnbuildableError(self._failure)
        self.parameters = _count(model, self.framework)
        self._built = (model, inputs)

    def _make(self) -> tuple[Any, Any]:
        if self.spec is None:
            if self.user_inputs is None:
                inputs = _infer_object_inputs(self.object, self.seed)
            else:
                inputs = self.user_inputs
            return self.object, inputs
        spec = self.spec
        if spec.kind == "hf":
            from gradcheck.backends import _hf

            model, inputs, _ = _hf.build(
                spec.name,
                dict(spec.overrides),
                spec.text,
                self.seed,
                self.max_parameters,
            )
            return model, inputs
        if spec.kind == "keras":
            from gradcheck.backends import _keras_apps

            model, x, _ = _keras_apps.build(spec.name, self.seed, self.max_parameters)
            return model, x
        module_name, _, attr = spec.name.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnbuildableError(
                f"{spec.text}: cannot import {module_name!r} ({exc}); is it on "
                "sys.path / PYTHONPATH?"
            ) from exc
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise UnbuildableError(f"{spec.text}: {module_name} has no {attr!r}.")
            obj = getattr(obj, part)
        if not callable(obj):
            raise UnbuildableError(f"{spec.text}: {attr!r} is not callable.")
        made = obj()
        if isinstance(made, tuple) and len(made) == 2:
            return made
        inputs = (
            None
            if self.user_inputs is not None
            else _infer_object_inputs(made, self.seed)
        )
        return made, inputs

    # ---------------------------------------------------------------- checks
    @property
    def weights(self) -> dict[str, float]:
        if self._weights is None:
            self._weights = draw_weights(self.seed)
        return self._weights

    def run(self, prop: str, dtype: str) -> CheckReport:
        """One property in one dtype: a report, never an exception (except
        InvalidArgumentError for a bad override)."""
        _check_choice("property", prop, PROPERTIES)
        _check_choice("dtype", dtype, DTYPES)
        label = _label(self.name, prop, dtype)
        started = time.perf_counter()
        try:
            self.build()
        except UnbuildableError as exc:
            return _publish(
                not_run_report(
                    "unbuildable",
                    self.name,
                    prop,
                    dtype,
                    str(exc),
                    seed=self.seed,
                    seconds=self.build_seconds,
                )
            )
        assert self._built is not None
        started = time.perf_counter()  # the check's own time, not the build's
        try:
            report = self._run(prop, dtype, label, started)
        except Exception as exc:  # noqa: BLE001 - the framework's reason, reported
            return _publish(
                not_run_report(
                    "error",
                    self.name,
                    prop,
                    dtype,
                    _reason(exc),
                    seed=self.seed,
                    framework=self.framework,
                    parameters=self.parameters,
                    seconds=time.perf_counter() - started,
                )
            )
        report.cost["seconds"] = time.perf_counter() - started
        report.cost["parameters"] = self.parameters
        return report

    def _keras_in(self, dtype: str) -> tuple[Any, Any]:
        """A Keras spec in another dtype: the application rebuilt under that
        dtype policy (same seed, same initial weights up to rounding), cached."""
        cache = self.__dict__.setdefault("_by_dtype", {})
        if dtype not in cache:
            assert self.spec is not None
            if self.spec.kind == "keras":
                from gradcheck.backends import _keras_apps

                model, x, _ = _keras_apps.build(
                    self.spec.name, self.seed, self.max_parameters, dtype
                )
                cache[dtype] = (model, x)
            else:
                cache[dtype] = self._built
        return cache[dtype]

    def _run(self, prop: str, dtype: str, label: str, started: float) -> CheckReport:
        """One check in eval mode; in train mode where the model's own code
        demands it (:func:`_wants_train`: Reformer's reversible layers assert
        ``self.training`` in their backward). A user checking such a model
        trains it in train mode: gradcheck checks that function, with every
        dropout and batch-norm module kept in eval mode (and every dropout of an
        ``hf:`` config 0), so it is deterministic, and says so in a note. Found
        once per model, then every check starts in train mode."""
        report = None
        if self.framework == "torch" and self._train is None:
            try:
                report = self._run_in(prop, dtype, label, started, train=False)
            except GradcheckError as exc:
                reason = _wants_train(exc)
                if reason is None:
                    raise
                self._train = reason
        if report is None:
            try:
                report = self._run_in(
                    prop, dtype, label, started, train=self._train is not None
                )
            except GradcheckError as exc:
                if self._train is None:
                    raise
                raise GradcheckError(
                    f"{exc} (checked in train mode, as the model's own error in "
                    f"eval mode asked: {self._train})"
                ) from exc
        if self._train is not None:
            report.notes.insert(0, _train_note(self._built[0], self._train))
        built = getattr(self._built[0], "gradcheck_build_note", None)
        if isinstance(built, str) and report.status not in NOT_RUN:
            report.notes.append(built)
        return report

    def _run_in(
        self, prop: str, dtype: str, label: str, started: float, train: bool
    ) -> CheckReport:
        import gradcheck

        model, inputs = self._built  # type: ignore[misc]
        if (
            self.framework == "tensorflow"
            and self.spec is not None
            and dtype != "float32"
        ):
            model, inputs = self._keras_in(dtype)
        with _prepared(model, inputs, dtype, self.framework, self.seed, train) as (
            m,
            heads,
        ):
            total, losses, expected = heads(self.weights, prop == "locality")
            if prop == "fd":
                report = gradcheck.check_gradients(
                    total, params=m, seed=self.seed, label=label
                )
            elif prop == "linearity":
                report = gradcheck.check_linearity(
                    total, losses, self.weights, params=m, seed=self.seed, label=label
                )
            else:
                report = gradcheck.check_locality(
                    total,
                    losses,
                    self.weights,
                    expected=expected,
                    params=m,
                    seed=self.seed,
                    label=label,
                )
            mixed = _kept_dtypes(m, dtype, self.framework)
            if mixed:
                report.notes.append(mixed)
            # parameters whose gradient a backward writes to .grad itself (and
            # not to torch.autograd.grad) are named by the torch backend from the
            # check's own backward passes (TorchSession._side_note): no rerun
            if self.shrink and report.status in SHRINK_STATUSES:
                self._shrink(report, prop, m, heads, started)
            return report

    def _shrink(
        self, report: CheckReport, prop: str, model: Any, heads: Any, started: float
    ) -> None:
        """Shrink the failing check's weights (:func:`shrink_weights`) on the
        same prepared model; the outcome is a note of the report and
        ``cost["shrink_checks"]`` / ``cost["shrink_seconds"]``. The reruns are
        the library's checks without a label, a bundle or listeners (a pytest
        session records the one check it asked for), and fd's without the
        blame search (only the verdict is needed)."""
        from gradcheck import api
        from gradcheck.properties import finite_difference

        def fails(weights: dict[str, float]) -> bool:
            total, losses, expected = heads(weights, prop == "locality")
            try:
                if prop == "fd":
                    opts = finite_difference.Options(seed=self.seed, blame_budget=0)
                    got = api._gradients_report(total, (), model, opts)
                else:  # expected is None for linearity (heads(..., False))
                    got = api._heads_report(
                        f"check_{prop}",
                        total,
                        losses,
                        weights,
                        (),
                        model,
                        self.seed,
                        None,
                        expected,
                    )
            except GradcheckError:
                return False  # no verdict at these weights: not a failure
            return got.status in SHRINK_STATUSES

        own = time.perf_counter() - started
        deadline = None
        if self.time_limit is not None:  # a worker's timeout: end well inside it
            deadline = time.monotonic() - own + 0.9 * self.time_limit
        result = shrink_weights(
            fails,
            self.weights,
            seconds=max(SHRINK_MIN_SECONDS, SHRINK_TIME_FACTOR * own),
            deadline=deadline,
            estimate=own,
        )
        report.notes.append(result.note())
        report.cost["shrink_checks"] = result.checks
        report.cost["shrink_seconds"] = round(result.seconds, 3)


def _kept_dtypes(model: Any, dtype: str, framework: str) -> str | None:
    """A note naming the parameters a torch model keeps in another dtype than
    the one checked (a router kept in float32 by the model's own ``_apply``
    or ``_keep_in_fp32_modules``), or None."""
    if framework != "torch":
        return None
    other: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        got = str(p.dtype).removeprefix("torch.")
        if p.is_floating_point() and got != dtype:
            other.setdefault(got, []).append(name)
    if not other:
        return None
    kept = "; ".join(
        f"{', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"
        f" in {d}"
        for d, names in sorted(other.items())
    )
    return (
        f"parameters in {' and '.join(sorted({dtype, *other}))}: the model keeps "
        f"{kept} after .to({dtype}); checked as it runs (the report's dtype is the "
        f"mixture, the row's the {dtype} asked for)."
    )


def _forward_raised(
    model: Any, exc: BaseException, dtype: Any, built: Any, origin: Any = None
) -> str:
    """The model's own forward raised at the point, before any loss or gradient:
    where (the innermost frame outside torch) and, in a dtype other than the
    one it was built and ran in, that the model's code does not run in it."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "/torch/" not in f.filename] or frames
    where = ""
    if own:
        f = own[-1]
        path = f.filename.split("site-packages/")[-1]
        here = os.getcwd() + os.sep
        path = path[len(here) :] if path.startswith(here) else path
        where = f" (at {path}:{f.lineno}, in {f.name})"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    name = str(dtype).replace("torch.", "")
    other = str(built).replace("torch.", "")
    runs = (
        f", though it runs in {other} (it was built and run in {other}): the "
        f"model's code does not support {name}"
        if dtype != built
        else ""
    )
    low = getattr(origin, "low", None)
    made = (
        f" The first {other} tensor of this {name} forward is made by {low}: a "
        "hard-coded or default-dtype constant there (torch.zeros(..., "
        "dtype=torch.float), torch.full without dtype=, .float())."
        if low
        else ""
    )
    return (
        f"{type(model).__name__}'s forward raises in {name}{runs}: "
        f"{type(exc).__name__}: {first}{where}. The model's own forward fails "
        f"before any loss or gradient: nothing to check in {name}." + made
    )


def _forward_not_finite(
    model: Any, out: Any, inputs: Any, dtype: Any, origin: Any = None
) -> str:
    import torch

    bad_op = getattr(origin, "nonfinite", None)
    low = getattr(origin, "low", None)
    where = (
        f" The first NaN/Inf comes from {bad_op}"
        + (f", after {low} left {str(dtype).replace('torch.', '')}" if low else "")
        + "."
        if bad_op
        else ""
    )

    bad = int((~torch.isfinite(out)).sum())
    shapes = inputs.items() if isinstance(inputs, Mapping) else []
    given = ", ".join(f"{k} {tuple(v.shape)}" for k, v in shapes if torch.is_tensor(v))
    return (
        f"{type(model).__name__}'s output is not finite ({bad} of {out.numel()} "
        f"elements NaN or inf) at its weights and inputs ({given}) in "
        f"{str(dtype).replace('torch.', '')}: the model's own forward, before any "
        "loss or gradient (at random initialisation: its init or its code, e.g. "
        "a fully masked attention row); nothing to check. Pass inputs= or other "
        "weights where these are not what the model expects." + where
    )


def _check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidArgumentError(
            f"unknown {what} {value!r}; expected one of {', '.join(choices)}."
        )


def _publish(report: CheckReport) -> CheckReport:
    from gradcheck import api

    return api._publish(report, report.label)


def _object_name(model: Any) -> str:
    return f"<{type(model).__module__}.{type(model).__qualname__}>"


def _framework(model: Any) -> str:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return "tensorflow"
    return "unknown"


def _count(model: Any, framework: str) -> int:
    if framework == "torch":
        return sum(p.numel() for p in model.parameters())
    return int(sum(math.prod(w.shape) for w in model.weights))


def _infer_object_inputs(model: Any, seed: int) -> Any:
    """Inputs for a model object: a transformers model's from its config; else
    the user must pass them."""
    if hasattr(model, "config") and hasattr(model, "main_input_name"):
        from gradcheck.backends import _hf

        return _hf.infer_inputs(model, seed)
    keras_shape = getattr(model, "input_shape", None)
    if isinstance(keras_shape, tuple) and all(
        isinstance(d, int) for d in keras_shape[1:]
    ):
        import numpy as np

        rng = np.random.default_rng(seed)
        return rng.standard_normal((2, *keras_shape[1:])).astype("float32")
    raise UnbuildableError(
        f"cannot infer the inputs of a {type(model).__name__} (not a transformers "
        "model, no fixed Keras input shape): pass inputs= (a dict of keyword "
        "arguments, a tuple of positional ones, or one tensor), or return "
        "(model, inputs) from your callable."
    )


#: a model's own error asking for train mode (Reformer's reversible layers:
#: "make sure to use `model.train()` to put the model into training mode")
_WANTS_TRAIN = re.compile(r"model\.train\(\)|\btrain(?:ing)? mode\b", re.I)


def _wants_train(exc: BaseException) -> str | None:
    """``"<type>: <first line>"`` of the model's own error in ``exc``'s causes
    when it asks for train mode, else None. gradcheck's own messages (a
    GradcheckError's text) are not read: only what the model raised."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if not isinstance(cur, GradcheckError):
            text = (str(cur).strip().splitlines() or [""])[0]
            if _WANTS_TRAIN.search(text):
                return f"{type(cur).__name__}: {text[:300]}"
        cur = cur.__cause__ or cur.__context__
    return None


def _train_note(model: Any, reason: str) -> str:
    return (
        f"checked in train mode: {type(model).__name__}'s own code refuses eval "
        f"mode ({reason}); dropout and batch-norm modules kept in eval mode (so the "
        "function is deterministic; an hf: config's dropouts are all 0), every "
        "module's mode restored afterwards"
    )


def _train_mode(model: Any) -> None:
    """``model.train()`` except the modules train mode makes random (dropout)
    or stateful (normalisation with running statistics, updated in place by a
    train-mode forward, on the user's buffers)."""
    import torch

    model.train()
    keep = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)
    for m in model.modules():
        if isinstance(m, keep):
            m.training = False


@contextlib.contextmanager
def _prepared(
    model: Any, inputs: Any, dtype: str, framework: str, seed: int, train: bool = False
) -> Iterator[tuple[Any, Any]]:
    """The model in eval mode (``train``: :func:`_train_mode`) and ``dtype`` (a
    copy when it must be converted; every module's mode restored afterwards) and
    a factory of the two-head losses."""
    if framework == "torch":
        with _torch_prepared(model, inputs, dtype, seed, train) as got:
            yield got
    else:
        yield _keras_prepared(model, inputs, dtype, seed)


def _copy_as(model: Any, want: Any) -> Any:
    """A copy of a torch model in dtype ``want``. Tensors a module keeps as plain
    attributes (outside parameters and buffers) are caches of its last forward:
    one that carries a graph (RecurrentGemma's ``recurrent_states``) cannot be
    deep-copied, so it is copied detached; one in another floating dtype (Mimi's
    codebook ``_embed``) is converted with the rest, as ``.to()`` does not."""
    import torch

    memo: dict[int, Any] = {}
    for m in model.modules():
        for v in vars(m).values():
            if torch.is_tensor(v) and v.grad_fn is not None:
                memo[id(v)] = v.detach().clone()
    twin = copy.deepcopy(model, memo).to(want)
    for m in twin.modules():
        for k, v in list(vars(m).items()):
            if (
                torch.is_tensor(v)
                and not isinstance(v, torch.nn.Parameter)
                and v.is_floating_point()
                and v.dtype != want
            ):
                m.__dict__[k] = v.to(want)
    return twin


def _origin(call: Any, dtype: Any) -> Any:
    """Where the forward first leaves ``dtype`` and first makes a NaN/Inf
    (:func:`gradcheck.backends._torch_kinks.forward_origin`)."""
    from gradcheck.backends._torch_kinks import forward_origin

    return forward_origin(call, dtype)


@contextlib.contextmanager
def _torch_prepared(
    model: Any, inputs: Any, dtype: str, seed: int, train: bool = False
) -> Iterator[tuple[Any, Any]]:
    import torch

    want = getattr(torch, dtype)
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if any(p.dtype != want for p in floating):
        model = _copy_as(model, want)
    inputs = _convert(inputs, lambda t: t.to(want) if t.is_floating_point() else t)
    modes = [(m, m.training) for m in model.modules()]
    # the forwards run here outside a check (the first output, the locality
    # reach, a mismatch's side-effect gradients) may draw or reseed torch's
    # generator (Reformer in train mode reseeds it in every forward): put back
    rng = torch.get_rng_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng_cuda = torch.cuda.get_rng_state_all() if cuda else None
    if train:
        _train_mode(model)
    else:
        model.eval()
    try:

        def call() -> Any:
            out = _call(model, inputs)
            first = _first_float(out, torch.is_tensor)
            if first is None:
                raise UnbuildableError(
                    f"{type(model).__name__} returned no floating tensor"
                )
            return first

        built = floating[0].dtype if floating else want
        try:
            with torch.no_grad():
                first = call()
        except UnbuildableError:
            raise
        except Exception as exc:
            origin = _origin(call, want) if want != built else None
            raise ForwardError(
                _forward_raised(model, exc, want, built, origin)
            ) from exc
        if first.is_floating_point() and not bool(torch.isfinite(first).all()):
            raise ForwardError(
                _forward_not_finite(model, first, inputs, want, _origin(call, want))
            )
        shape = first.shape
        gen = torch.Generator().manual_seed(seed)
        n = max(math.prod(shape), 1)
        proj = torch.randn(shape, generator=gen, dtype=torch.float64).to(want) / (
            math.sqrt(n)
        )

        def heads(weights: Mapping[str, float], locality: bool) -> tuple[Any, ...]:
            wm, wa = weights["main"], weights["aux"]

            def main() -> Any:
                return (call() * proj).sum()

            def aux() -> Any:
                return call().pow(2).mean()

            def total() -> Any:
                o = call()
                return wm * (o * proj).sum() + wa * o.pow(2).mean()

            expected = None
            if locality:
                named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
                out = call()
                # a backward may write parameter gradients to .grad instead of
                # returning them (Reformer's reversible layers call .backward()
                # inside their autograd.Function): those count as reached too
                held = [(p, p.grad) for _, p in named]
                for p, _ in held:
                    p.grad = None
                try:
                    grads = torch.autograd.grad(
                        out.sum(), [p for _, p in named], allow_unused=True
                    )
                    grads = tuple(
                        g if g is not None else p.grad
                        for (_, p), g in zip(named, grads, strict=True)
                    )
                except Exception as exc:  # as fd/linearity name a raising backward
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    raise GradcheckError(
                        f"the backward pass through {type(model).__name__}'s first "
                        f"output raised {type(exc).__name__}: {first} (while finding "
                        "which parameters the output reaches, the locality check's "
                        "expected flow)"
                    ) from exc
                finally:
                    for p, g in held:
                        p.grad = g
                expected = {
                    k: (list(HEADS) if g is not None else [])
                    for (k, _), g in zip(named, grads, strict=True)
                }
            return total, {"main": main, "aux": aux}, expected

        yield model, heads
    finally:
        for m, training in modes:
            m.training = training
        torch.set_rng_state(rng)
        if rng_cuda is not None:
            torch.cuda.set_rng_state_all(rng_cuda)


def _keras_prepared(model: Any, x: Any, dtype: str, seed: int) -> tuple[Any, Any]:
    import numpy as np
    import tensorflow as tf

    weights_dtype = {
        str(getattr(w, "dtype", "float32")) for w in model.trainable_weights
    }
    if weights_dtype and weights_dtype != {dtype}:
        raise InvalidArgumentError(
            f"this Keras model's weights are {sorted(weights_dtype)}, not {dtype}; "
            f"build it in {dtype} (keras.config.set_dtype_policy('{dtype}')) to check "
            f"{dtype}."
        )
    x = _convert(x, lambda t: tf.cast(t, dtype) if t.dtype.is_floating else t, tf)

    def call() -> Any:
        out = model(x, training=False) if not isinstance(x, Mapping) else model(x)
        first = _first_float(out, lambda t: tf.is_tensor(t))
        if first is None:
            raise UnbuildableError(
                f"{type(model).__name__} returned no floating tensor"
            )
        return first

    shape = tuple(call().shape)
    rng = np.random.default_rng(seed)
    n = max(math.prod(shape), 1)
    proj = tf.constant(rng.standard_normal(shape) / math.sqrt(n), dtype=dtype)

    def heads(weights: Mapping[str, float], locality: bool) -> tuple[Any, ...]:
        wm, wa = weights["main"], weights["aux"]

        def main() -> Any:
            return tf.reduce_sum(call() * proj)

        def aux() -> Any:
            return tf.reduce_mean(tf.square(call()))

        def total() -> Any:
            o = call()
            return wm * tf.reduce_sum(o * proj) + wa * tf.reduce_mean(tf.square(o))

        expected = None
        if locality:
            from gradcheck.backends.tensorflow import _var_label

            variables = list(model.trainable_variables)
            with tf.GradientTape() as tape:
                out = call()
                s = tf.reduce_sum(out)
            grads = tape.gradient(s, variables)
            if all(g is not None for g in grads):
                expected = {"*": list(HEADS)}
            else:
                expected = {
                    _var_label(v) or f"variable[{i}]": (
                        list(HEADS) if g is not None else []
                    )
                    for i, (v, g) in enumerate(zip(variables, grads, strict=True))
                }
        return total, {"main": main, "aux": aux}, expected

    return model, heads


def _convert(inputs: Any, fn: Any, tf: Any = None) -> Any:
    def leaf(v: Any) -> Any:
        if tf is None:
            import torch

            return fn(v) if torch.is_tensor(v) else v
        if hasattr(v, "dtype") and hasattr(v, "shape"):
            return fn(tf.convert_to_tensor(v))
        return v

    if isinstance(inputs, Mapping):
        return {k: leaf(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(leaf(v) for v in inputs)
    return leaf(inputs)


def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _first_float(out: Any, is_tensor: Any) -> Any:
    if is_tensor(out):
        dt = out.dtype
        floating = getattr(dt, "is_floating_point", None)
        if floating is None:  # a TF DType
            floating = getattr(dt, "is_floating", False)
        return out if floating else None
    if isinstance(out, Mapping):  # transformers' ModelOutput, Keras dict outputs
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            found = _first_float(item, is_tensor)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------- front door
def _as_tuple(value: Any, what: str, choices: Sequence[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip()]
    if not items:
        raise InvalidArgumentError(f"no {what} given; expected some of {choices}.")
    for item in items:
        _check_choice(what, item, choices)
    return tuple(dict.fromkeys(items))


def check_model(
    spec_or_model: Any,
    *,
    inputs: Any = None,
    dtype: str | Sequence[str] = "float32",
    properties: str | Sequence[str] = PROPERTIES,
    seed: int = 0,
    timeout: float | None = None,
    max_parameters: int = MAX_PARAMETERS,
    repro_dir: Any = None,
    weights: Mapping[str, float] | None = None,
    shrink: bool = True,
) -> ModelReports:
    """Check a model by name (``"hf:bert"``, ``"keras:MobileNetV3Small"``,
    ``"package.module:callable"``) or a model object (torch ``nn.Module``, Keras
    model; ``inputs=`` unless they can be inferred from a transformers config).

    ``dtype``: "float32", "float64", or several ("float32,float64" or a list);
    ``properties``: some of "fd", "linearity", "locality". Returns a
    :class:`ModelReports`: one :class:`~gradcheck.CheckReport` per property x
    dtype, labelled ``"<spec> <property> <dtype>"``, with ``cost["seconds"]`` and
    ``cost["parameters"]``. A model that cannot be built gives ``unbuildable``
    reports with the framework's reason. ``timeout`` (seconds): the checks run in
    the worker process (one for many models, see above) and past the limit are
    ``timeout``; a model object must then be picklable. A bad spec or override
    is an InvalidArgumentError. The model object's parameters, buffers and train/eval flags are unchanged.
    ``repro_dir``: each failing check writes a repro bundle there (spec, weights,
    inputs, seed, loss weights, dtype, versions; :mod:`gradcheck.repro`), named by
    the report's ``repro_bundle``; ``gradcheck replay`` reruns it.

    ``weights``: the two heads' loss weights, ``{"main": w, "aux": w}``; default
    drawn by Hypothesis from ``seed`` (:func:`draw_weights`). ``shrink``: a
    ``mismatch`` has its weights shrunk to the simplest set that still fails
    (:func:`shrink_weights`, at most SHRINK_MAX_CHECKS extra checks and about
    the failing check's own time), printed in a note ("fails with weights
    main=1.0, aux=0.0 (shrunk from ...)"); ``shrink=False`` turns it off."""
    from gradcheck.api import _seed

    seed = _seed(seed)
    weights = _weights_arg(weights)
    options = {"weights": weights, "shrink": bool(shrink)}
    dtypes = _as_tuple(dtype, "dtype", DTYPES)
    props = _as_tuple(properties, "property", PROPERTIES)
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not timeout > 0
    ):
        raise InvalidArgumentError(
            f"timeout must be a positive number of seconds or None; got {timeout!r}."
        )
    if isinstance(spec_or_model, (str, Spec)):
        specs = (
            expand_specs([spec_or_model])
            if isinstance(spec_or_model, str)
            else [spec_or_model]
        )
        if len(specs) != 1:
            raise InvalidArgumentError(
                "check_model checks one model; for 'hf:*' iterate over "
                "gradcheck.models.expand_specs(['hf:*']) or use the CLI."
            )
        target: Any = specs[0]
    else:
        target = spec_or_model
    jobs = [(p, d) for d in dtypes for p in props]
    checker = None
    if timeout is None:
        checker = Checker(
            target, inputs, seed=seed, max_parameters=max_parameters, **options
        )
        reports = ModelReports(checker.run(p, d) for p, d in jobs)
    else:
        reports = ModelReports(
            _run_with_timeout(
                target, inputs, jobs, seed, float(timeout), max_parameters, options
            )
        )
    from gradcheck import repro

    repro.write_model_bundles(
        repro_dir, reports, target, inputs, seed, max_parameters, checker, weights
    )
    return reports


# --------------------------------------------------------------------- timeouts
#: a worker process's address-space limit in bytes (``resource.RLIMIT_AS``, where
#: the platform has it): an allocation past it fails inside the check, which then
#: reports ``error`` ("out of memory"), instead of the machine running out of memory
WORKER_MEMORY = 8 * 2**30
#: a worker serves models until it has served this many, or its resident memory
#: after a model is above WORKER_RECYCLE_RSS; then a fresh one is started
WORKER_MODELS = 200
WORKER_RECYCLE_RSS = 3 * 2**30
#: how long a worker may take to start (import its framework) before its clock
STARTUP_SECONDS = 300.0
_OOM_NEEDLES = ("can't allocate memory", "std::bad_alloc", "Cannot allocate memory")


def _worker(conn: Any, memory: int | None) -> None:
    """Spawned once, serves many models (the framework is imported once): for each
    request, build once, run the jobs in order, send each report. Never raises:
    whatever a model throws is an ``error`` report with the reason."""
    _limit_memory(memory)
    _quiet_frameworks()
    _exit_with_parent()
    while True:
        try:
            payload = conn.recv()
        except (EOFError, OSError):
            return
        if payload is None:
            return
        target, inputs, jobs, seed, max_parameters, options = pickle.loads(payload)
        _import_framework(target)  # start-up, before the clock: not the check's time
        _quiet_frameworks()
        conn.send(("ready",))
        checker = Checker(
            target, inputs, seed=seed, max_parameters=max_parameters, **options
        )
        try:
            checker.build()
            conn.send(("built", checker.parameters, checker.framework))
        except UnbuildableError:
            conn.send(("built", 0, "unknown"))  # each job reports unbuildable
        except InvalidArgumentError as exc:  # a bad override: the parent re-raises
            conn.send(("raise", exc))
            continue
        except BaseException as exc:  # noqa: BLE001 - reported, never a traceback
            checker._failure = _reason(exc, memory)
            conn.send(("built", 0, "unknown"))
        for i, (prop, dtype) in jobs:
            conn.send(("start", i))
            try:
                report = checker.run(prop, dtype)
            except BaseException as exc:  # noqa: BLE001
                report = _publish(
                    not_run_report(
                        "error",
                        checker.name,
                        prop,
                        dtype,
                        _reason(exc, memory),
                        seed=seed,
                        framework=checker.framework,
                        parameters=checker.parameters,
                    )
                )
            else:
                if report.status in ("error", "unbuildable") and memory:
                    report.notes[0] = _oom_note(report.notes[0], memory)
            conn.send(("report", i, report))
        del checker
        import gc

        gc.collect()
        conn.send(("done", _rss()))


def _exit_with_parent() -> None:
    """A worker whose parent died (killed, Ctrl-C) exits within a second instead
    of finishing its model on a shared machine."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="gradcheck-parent").start()


def _limit_memory(memory: int | None) -> None:
    if not memory:
        return
    with contextlib.suppress(Exception):  # no resource module, or not allowed
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            memory = min(memory, hard)
        if soft == resource.RLIM_INFINITY or soft > memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, hard))


def _oom_note(reason: str, memory: int | None) -> str:
    if not memory:
        return reason
    if any(n in reason for n in _OOM_NEEDLES) or reason.startswith("MemoryError"):
        return (
            f"out of memory: the check needed more than the worker's "
            f"{memory / 2**30:g} GiB address-space limit ({reason})"
        )
    return reason


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:  # not Linux
        return 0


def _quiet_frameworks() -> None:
    """The worker's stderr is the user's terminal: transformers' advice and Python
    warnings about the shrunk configs are not theirs to read."""
    import sys
    import warnings

    warnings.simplefilter("ignore")
    if "transformers" in sys.modules:
        with contextlib.suppress(Exception):
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()


def _import_framework(target: Any) -> None:
    with contextlib.suppress(Exception):  # building reports what is missing
        if isinstance(target, Spec) and target.kind == "keras":
            from gradcheck._quiet import import_quietly

            import_quietly("tensorflow")  # TF's import banner, not the user's noise
            import keras  # noqa: F401
        elif isinstance(target, Spec) and target.kind == "hf":
            import transformers  # noqa: F401
        elif isinstance(target, Spec):
            importlib.import_module(target.name.partition(":")[0])


#: the worker process serving models: {"proc", "conn", "served"}
_WORKER: dict[str, Any] = {}


def _get_worker() -> tuple[Any, Any]:
    proc = _WORKER.get("proc")
    if proc is not None and proc.is_alive() and _WORKER["served"] < WORKER_MODELS:
        return proc, _WORKER["conn"]
    retire_worker()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_worker, args=(child, WORKER_MEMORY), daemon=True)
    proc.start()
    child.close()
    _WORKER.update(proc=proc, conn=parent, served=0)
    return proc, parent


def retire_worker(kill: bool = False) -> None:
    """Stop the worker process (politely, unless ``kill``); the next check with a
    timeout starts a fresh one."""
    proc, conn = _WORKER.pop("proc", None), _WORKER.pop("conn", None)
    _WORKER.pop("served", None)
    if conn is not None:
        if not kill:
            with contextlib.suppress(Exception):
                conn.send(None)
        with contextlib.suppress(Exception):
            conn.close()
    if proc is not None:
        if not kill:
            proc.join(5)
        _stop(proc)


def _run_with_timeout(
    target: Any,
    inputs: Any,
    jobs: list[tuple[str, str]],
    seed: int,
    timeout: float,
    max_parameters: int,
    options: Mapping[str, Any] | None = None,
) -> list[CheckReport]:
    name = target.text if isinstance(target, Spec) else _object_name(target)
    options = {**(options or {}), "time_limit": timeout}
    results: dict[int, CheckReport] = {}
    pending = list(enumerate(jobs))
    parameters, framework = 0, "unknown"
    while pending:
        try:
            payload = pickle.dumps(
                (target, inputs, pending, seed, max_parameters, options)
            )
        except Exception as exc:
            raise InvalidArgumentError(
                f"timeout= runs the checks in a worker process, and this model or "
                f"its inputs cannot be pickled ({type(exc).__name__}: {exc}). Pass a "
                "spec such as 'package.module:callable' that builds it, or "
                "timeout=None."
            ) from exc
        proc, conn = _get_worker()
        _WORKER["served"] += 1
        healthy = False
        try:
            conn.send(payload)
            current: int | None = None
            ready = False
            deadline = time.monotonic() + STARTUP_SECONDS
            started = time.perf_counter()
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not conn.poll(left):
                    i = current if current is not None else pending[0][0]
                    prop, dtype = jobs[i]
                    what = "the check" if current is not None else "building the model"
                    limit = timeout if ready else STARTUP_SECONDS
                    if not ready:
                        what = "starting the worker process (importing the framework)"
                    results[i] = _publish(
                        not_run_report(
                            "timeout",
                            name,
                            prop,
                            dtype,
                            f"{what} took more than {limit:g} s; stopped (the "
                            "worker process was killed). Raise --timeout / timeout= "
                            "or shrink the model with overrides.",
                            seed=seed,
                            framework=framework,
                            parameters=parameters,
                            seconds=time.perf_counter() - started,
                        )
                    )
                    pending = [(j, job) for j, job in pending if j != i]
                    break
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    proc.join(5)
                    i = current if current is not None else pending[0][0]
                    prop, dtype = jobs[i]
                    results[i] = _publish(
                        not_run_report(
                            "error",
                            name,
                            prop,
                            dtype,
                            _died(proc.exitcode),
                            seed=seed,
                            framework=framework,
                            parameters=parameters,
                        )
                    )
                    pending = [(j, job) for j, job in pending if j != i]
                    break
                if msg[0] == "raise":
                    healthy = True
                    raise msg[1]
                if msg[0] == "ready":  # building gets timeout seconds
                    ready = True
                    deadline = time.monotonic() + timeout
                    started = time.perf_counter()
                elif msg[0] == "built":
                    parameters, framework = msg[1], msg[2]
                elif msg[0] == "start":
                    current = msg[1]
                    deadline = time.monotonic() + timeout
                    started = time.perf_counter()
                elif msg[0] == "report":
                    results[msg[1]] = _publish(msg[2])
                    pending = [(j, job) for j, job in pending if j != msg[1]]
                    current = None
                elif msg[0] == "done":
                    healthy = msg[1] <= WORKER_RECYCLE_RSS
                    break
        finally:
            if not healthy:  # killed at a deadline, died, or too big to keep
                retire_worker(kill=True)
    return [results[i] for i in range(len(jobs))]


def _died(exitcode: int | None) -> str:
    import signal

    how = f"exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            how = f"killed by {signal.Signals(-exitcode).name}"
    return (
        f"the worker process died ({how}) during the check: a crash in the "
        "framework, or killed from outside (the system's out-of-memory killer); "
        f"the worker's own memory limit is {WORKER_MEMORY / 2**30:g} GiB."
    )


def _stop(proc: Any) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)
