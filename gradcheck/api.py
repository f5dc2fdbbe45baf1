"""The library assertions: check_* return a report, assert_* raise on failure."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence, ValuesView
from typing import Any

from gradcheck import _blas
from gradcheck.backends import Session, open_session
from gradcheck.errors import (
    FrameworkError,
    FunctionRaisedError,
    GradcheckError,
    GradientMismatchError,
    InvalidArgumentError,
    wrap_exception,
)
from gradcheck.properties import cross_framework, finite_difference, linearity, locality
from gradcheck.result import CheckReport

__all__ = [
    "assert_cross_framework",
    "assert_gradients",
    "assert_linearity",
    "assert_locality",
    "assert_variants",
    "check_cross_framework",
    "check_gradients",
    "check_linearity",
    "check_locality",
    "check_variants",
]

#: seed=None means this seed (or $GRADCHECK_SEED): checks are deterministic by
#: default, so a CI failure reproduces locally; pass seed= to vary directions.
DEFAULT_SEED = 0

#: Callbacks run with every report (the pytest plugin records through this).
_listeners: list[Callable[[CheckReport], None]] = []


def _seed(seed: int | None) -> int:
    if seed is None:
        env = os.environ.get("GRADCHECK_SEED")
        try:
            return int(env) if env else DEFAULT_SEED
        except ValueError:
            raise InvalidArgumentError(
                f"GRADCHECK_SEED={env!r} is not an integer."
            ) from None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError(
            f"seed must be a non-negative int or None; got {seed!r}."
        )
    return seed


def _inputs(inputs: Any) -> Sequence[Any]:
    # a lone tensor is the common slip: treat it as a 1-tuple
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _code_of(fn: Any) -> Any:
    """The code object a call of ``fn`` runs (functions, bound methods, modules'
    forward, objects with __call__, functools.partial)."""
    fn = getattr(fn, "func", fn)  # functools.partial
    code = getattr(fn, "__code__", None)
    for attr in ("forward", "__call__"):  # an nn.Module, a callable object
        for klass in type(fn).__mro__:
            if code is None and attr in vars(klass):
                code = getattr(vars(klass)[attr], "__code__", None)
    return code


@contextlib.contextmanager
def no_raw_exceptions(check: str, **user_fns: Any) -> Iterator[None]:
    """Let no framework exception escape a public check raw.

    ``user_fns``: {label: callable} the check calls (fn, total_fn, loss_fns[...],
    step_fn). A backend may already have turned their exceptions into
    GradcheckErrors (the torch backend does); those pass unchanged. Any other
    exception becomes a GradcheckError that keeps the original type where
    Python allows (``except ValueError`` still works) and the original as
    ``__cause__``: a FunctionRaisedError naming the callable when its frame is in
    the traceback (the user's own error), else a FrameworkError (gradcheck's own
    work on the user's tensors raised)."""
    try:
        yield
    except GradcheckError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        first = f"{type(exc).__name__}: {text[0][:300] if text else ''}"
        codes = {_code_of(f): label for label, f in user_fns.items()}
        codes.pop(None, None)
        tb, label = exc.__traceback__, None
        while tb is not None and label is None:
            label = codes.get(tb.tb_frame.f_code)
            tb = tb.tb_next
        if label is not None:
            raise wrap_exception(
                FunctionRaisedError,
                exc,
                f"{label} raised {first} when {check} called it: the error is in "
                f"{label} (or in what it calls), not in gradcheck; call it once "
                "yourself to see it. The original exception is the __cause__ of "
                "this one.",
            ) from exc
        raise wrap_exception(
            FrameworkError,
            exc,
            f"{check} could not finish: {first}, raised in gradcheck's own work "
            "on your tensors, not in the functions you passed. This is a case "
            "gradcheck does not handle yet: please report it with this traceback "
            "(the original exception is the __cause__). Meanwhile, check the "
            "tensors one group at a time, or a float64 copy of the model.",
        ) from exc


def _loss_labels(loss_fns: Any) -> dict[str, Any]:
    items = loss_fns.items() if isinstance(loss_fns, Mapping) else ()
    return {f"loss_fns[{k!r}]": f for k, f in items}


def _rtol(session: Session, rtol: float | None) -> float | None:
    """The user's rtol, else the rounding of an autocast the check runs under."""
    return session.rounding_override(rtol)


def _params(params: Any) -> Any:
    """``params=model.parameters()`` / ``model.named_parameters()`` (generators)
    and dict views are read once into a list / dict, as a list or dict of
    tensors would be given."""
    if isinstance(params, (Iterator, ValuesView)):
        items = list(params)
        if items and all(
            isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str)
            for i in items
        ):
            return dict(items)  # named_parameters(): keep the names
        return items
    return params


def _publish(report: CheckReport, label: str | None) -> CheckReport:
    report.label = label
    for listener in list(_listeners):
        listener(report)
    return report


#: Derivative orders and automatic-differentiation modes check_gradients judges.
ORDERS = (1, 2)
AD_MODES = ("reverse", "forward", "both")


def _order_and_ad(order: Any, ad: Any) -> tuple[int, str]:
    if isinstance(order, bool) or order not in ORDERS:
        raise InvalidArgumentError(
            f"order must be 1 (gradients) or 2 (second derivatives: gradients of "
            f"gradients); got {order!r}."
        )
    if ad not in AD_MODES:
        raise InvalidArgumentError(
            f"ad must be 'reverse' (backward), 'forward' (jvp) or 'both' (each "
            f"against finite differences, and forward against reverse); got {ad!r}."
        )
    return int(order), str(ad)


def _open_for(
    fn: Callable[..., Any], inputs: Sequence[Any], params: Any, order: int, seed: int
) -> Session:
    """The session a check of ``order`` runs on: fn's own at order 1; at order 2
    the backend's derived function g(inputs, grad_outputs) = the VJP of fn, built
    to be differentiated (torch: create_graph=True; TensorFlow: nested tapes), so
    that the order-1 engine judges fn's second derivatives with everything it
    does for gradients (float64 reference, measured rounding, blame by name)."""
    if order == 1:
        return open_session(fn, inputs, params)
    from gradcheck.backends import detect_framework

    if not callable(fn):
        raise InvalidArgumentError(f"fn must be callable; got {type(fn).__name__}.")
    if detect_framework(inputs, params) == "torch":
        from gradcheck.backends import _is_keras_torch, _keras_torch_params, _leaves
        from gradcheck.backends.torch import second_order_session

        if _is_keras_torch(params) or any(_is_keras_torch(p) for p in _leaves(params)):
            params = _keras_torch_params(params)
        return second_order_session(fn, inputs, params, seed)
    from gradcheck.backends.tensorflow import second_order_session as tf_second

    return tf_second(fn, inputs, params, seed)


def check_gradients(
    fn: Callable[..., Any],
    inputs: Any = (),
    *,
    params: Any = None,
    order: int = 1,
    ad: str = "reverse",
    seed: int | None = None,
    mode: str = "auto",
    rtol: float | None = None,
    step: float | None = None,
    label: str | None = None,
    repro_dir: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Compare ``fn``'s framework gradients with finite differences.

    ``fn(*inputs)`` returns a scalar, a tensor, or a tuple/list/dict of tensors.
    Differentiated: floating tensors in ``inputs`` that require grad (torch) / are
    float (TF), and ``params`` (an ``nn.Module``, ``keras.Model``/layer, or a list/dict
    of Parameters/Variables that ``fn`` reads).

    ``order``: 1 checks gradients; 2 checks second derivatives: the framework's
    derivatives of its own first-order gradient (Hessian-vector products of a
    loss, for inputs and parameters, and the derivative w.r.t. the incoming
    gradient, as torch's gradgradcheck) against finite differences of that
    gradient, float32 judged against a float64 reference as at order 1.

    ``ad``: "reverse" judges the backward pass; "forward" the forward-mode
    derivative (torch forward AD, a custom Function's ``jvp``; TensorFlow's
    ``ForwardAccumulator``) <v, J d> against finite differences; "both" runs
    both checks and also compares forward with reverse mode.

    Complex tensors (torch tensors and parameters; TensorFlow input tensors) are
    checked as their real and imaginary parts (named ``view_as_real(...)``, last
    index 0 = real, 1 = imaginary): the gradient of a real loss L w.r.t. z is
    dL/dRe z + i dL/dIm z in torch and in TensorFlow (measured), so the real view
    of that gradient is compared with finite differences over both parts;
    complex64 is judged against a complex128 reference.

    ``mode``: "auto" (full Jacobian for <= 64 inputs and outputs, else directional),
    "directional" or "full". ``rtol`` overrides the expected gradient rounding of the
    native dtype; ``step`` the relative finite-difference step.

    ``repro_dir``: a failing check (mismatch, nondifferentiable,
    nondeterministic) writes a repro bundle there (:mod:`gradcheck.repro`) and
    ``report.repro_bundle`` names it; ``gradcheck replay`` reruns it when ``fn``
    is importable. Default: the pytest plugin's ``--gradcheck-repro-dir``, else
    none.
    """
    order, ad = _order_and_ad(order, ad)
    opts = finite_difference.Options(seed=_seed(seed), mode=mode, rtol=rtol, step=step)
    inputs, params = _inputs(inputs), _params(params)
    report = _gradients_report(fn, inputs, params, opts, order, ad, rtol)
    report.label = label
    from gradcheck import repro

    options: dict[str, Any] = {
        "seed": opts.seed,
        "mode": mode,
        "rtol": rtol,
        "step": step,
    }
    if order != 1 or ad != "reverse":
        options.update(order=order, ad=ad)
    repro.write_gradients_bundle(repro_dir, report, fn, inputs, params, options)
    return _publish(report, label)


def _gradients_report(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    params: Any,
    opts: finite_difference.Options,
    order: int = 1,
    ad: str = "reverse",
    rtol: float | None = None,
) -> CheckReport:
    """check_gradients' verdict alone: no label, no bundle, no listeners (the
    loss-weight shrink of :mod:`gradcheck.models` reruns checks through it)."""
    with no_raw_exceptions("check_gradients", fn=fn):
        report = _check(fn, inputs, params, opts, order, ad, rtol)
    report.order, report.ad = order, ad
    return report


def _check(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    params: Any,
    opts: finite_difference.Options,
    order: int,
    ad: str,
    rtol: float | None,
) -> CheckReport:
    """One engine run per automatic-differentiation mode: "both" judges reverse
    mode first and, where it passes, forward mode against finite differences and
    against reverse mode (finite_difference.Options.ad). One host BLAS thread for
    the check's NumPy arithmetic: the framework's own thread pool keeps the cores
    (see gradcheck._blas)."""
    runs = ["reverse", "both"] if ad == "both" else [ad]
    report: CheckReport | None = None
    with _blas.single_threaded():
        for mode in runs:
            with _open_for(fn, inputs, params, order, opts.seed) as session:
                o = dataclasses.replace(opts, rtol=_rtol(session, rtol), ad=mode)
                report = finite_difference.run(session, o)
            if not report.passed:
                if ad == "both" and mode == "reverse":
                    report.notes.append(
                        "ad='both': reverse mode failed against finite differences, "
                        "so forward mode was not run."
                    )
                return report
    assert report is not None
    return report


def assert_gradients(
    fn: Callable[..., Any], inputs: Any = (), **kwargs: Any
) -> CheckReport:
    """Like :func:`check_gradients`; raises :class:`GradientMismatchError` on failure."""
    report = check_gradients(fn, inputs, **kwargs)
    if not report.passed:
        raise GradientMismatchError(report)
    return report


def check_linearity(
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    weights: Mapping[str, float],
    inputs: Any = (),
    *,
    params: Any = None,
    seed: int | None = None,
    rtol: float | None = None,
    label: str | None = None,
    repro_dir: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Check grad(total) = sum_i weights[i] * grad(loss_fns[i]) for every tensor.

    Returns a report whose ``flow`` is the gradient-flow matrix (which loss reaches
    which parameter, by name, and the effective weight it has there).

    ``repro_dir``: a failing check writes a repro bundle there, as
    :func:`check_gradients` does (``total_fn`` and each of ``loss_fns`` recorded
    by ``module:qualname``, or as methods of ``params``); default: the pytest
    plugin's ``--gradcheck-repro-dir``, else none."""
    heads = (total_fn, loss_fns, weights)
    return _heads_check(
        "check_linearity", heads, inputs, params, seed, rtol, label, repro_dir
    )


#: a multi-loss check's functions: total_fn, loss_fns, weights
_Heads = tuple[
    Callable[..., Any], Mapping[str, Callable[..., Any]], Mapping[str, float]
]


def _heads_check(
    entry: str,
    heads: _Heads,
    inputs: Any,
    params: Any,
    seed: int | None,
    rtol: float | None,
    label: str | None,
    repro_dir: str | os.PathLike[str] | None,
    expected: Mapping[str, Any] | None = None,
) -> CheckReport:
    """check_linearity / check_locality (``entry``; ``expected`` for the
    latter): the verdict, its label, its repro bundle, published."""
    s = _seed(seed)
    inputs, params = _inputs(inputs), _params(params)
    report = _heads_report(entry, *heads, inputs, params, s, rtol, expected)
    report.label = label
    from gradcheck import repro

    extra = {} if expected is None else {"expected": expected}
    options = {"seed": s, "rtol": rtol}
    repro.write_heads_bundle(
        repro_dir, report, entry, *heads, inputs, params, options, **extra
    )
    return _publish(report, label)


def _heads_report(
    entry: str,
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    weights: Mapping[str, float],
    inputs: Sequence[Any],
    params: Any,
    seed: int,
    rtol: float | None,
    expected: Mapping[str, Any] | None = None,
) -> CheckReport:
    """check_linearity's or check_locality's (``entry``, ``expected`` for the
    latter) verdict alone: no label, no bundle, no listeners."""
    linearity.validate(loss_fns, weights)
    with no_raw_exceptions(entry, total_fn=total_fn, **_loss_labels(loss_fns)):
        with open_session(total_fn, inputs, params) as session:
            r = _rtol(session, rtol)
            if entry == "check_locality":
                return locality.run(
                    session,
                    total_fn,
                    loss_fns,
                    weights,
                    expected,
                    seed=seed,
                    rtol=r,
                )
            return linearity.run(
                session, total_fn, loss_fns, weights, seed=seed, rtol=r
            )


def assert_linearity(
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    weights: Mapping[str, float],
    inputs: Any = (),
    **kwargs: Any,
) -> CheckReport:
    """Like :func:`check_linearity`; raises :class:`GradientMismatchError` on failure."""
    report = check_linearity(total_fn, loss_fns, weights, inputs, **kwargs)
    if not report.passed:
        raise GradientMismatchError(report)
    return report


def check_locality(
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    weights: Mapping[str, float],
    inputs: Any = (),
    *,
    expected: Mapping[str, Any],
    params: Any = None,
    seed: int | None = None,
    rtol: float | None = None,
    label: str | None = None,
    repro_dir: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Check that each loss reaches exactly the parameters the architecture says.

    ``expected`` maps tensor names, layer names (a dotted or slashed prefix such as
    ``"heads.aux"``) or globs to the losses that should reach them; every
    differentiated tensor must be covered. For a model built from a spec,
    ``built.expected_flow()`` is this dict. Also checks the weights (as
    :func:`check_linearity`) and that tensors only zero-weight losses reach get
    exactly zero gradient. The report's ``flow.expected`` holds the expectation
    next to ``flow.reaches``.

    ``repro_dir``: a failing check writes a repro bundle there (``expected`` is
    recorded as JSON), as :func:`check_linearity` does."""
    heads = (total_fn, loss_fns, weights)
    return _heads_check(
        "check_locality", heads, inputs, params, seed, rtol, label, repro_dir, expected
    )


def assert_locality(
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    weights: Mapping[str, float],
    inputs: Any = (),
    **kwargs: Any,
) -> CheckReport:
    """Like :func:`check_locality`; raises :class:`GradientMismatchError` on failure."""
    report = check_locality(total_fn, loss_fns, weights, inputs, **kwargs)
    if not report.passed:
        raise GradientMismatchError(report)
    return report


def check_cross_framework(
    spec: Any,
    batch: Mapping[str, Any] | None = None,
    *,
    dtype: str = "float64",
    seed: int | None = None,
    rtol: float | None = None,
    label: str | None = None,
    repro_dir: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Build ``spec`` (a :class:`gradcheck.architectures.ModelSpec`) in PyTorch and in
    Keras with the same weights and check that every loss and its gradient with
    respect to every weight agree, elementwise, within ``dtype``'s rounding.

    ``batch`` defaults to ``random_batch(spec, 8, seed)``. Needs torch and Keras on
    the TensorFlow backend. Gradients are compared in the spec's neutral layout, so
    the report names parameters as ``"layer/kernel"``.

    ``repro_dir``: a failing check writes a repro bundle there (the spec as
    JSON data, the batch); ``gradcheck replay`` reruns it. Default: the pytest
    plugin's ``--gradcheck-repro-dir``, else none."""
    from gradcheck import repro
    from gradcheck.architectures.base import check_dtype

    s = _seed(seed)
    dtype = check_dtype(dtype)
    with no_raw_exceptions("check_cross_framework"), _global_rng_kept():
        report = cross_framework.run(spec, batch, dtype=dtype, seed=s, rtol=rtol)
    report.label = label
    repro.write_cross_framework_bundle(
        repro_dir, report, spec, batch, dtype=dtype, seed=s, rtol=rtol
    )
    return _publish(report, label)


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Python's, NumPy's and (when loaded) torch's CPU random states put back
    afterwards: building the spec's Keras model draws layer seeds from Python's
    ``random`` (measured: check_cross_framework moved it), which is the user's."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    torch = sys.modules.get("torch")
    t = torch.get_rng_state() if torch is not None else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch = sys.modules.get("torch")
        if t is not None and torch is not None:
            torch.set_rng_state(t)


def assert_cross_framework(spec: Any, batch: Any = None, **kwargs: Any) -> CheckReport:
    """Like :func:`check_cross_framework`; raises :class:`GradientMismatchError`."""
    report = check_cross_framework(spec, batch, **kwargs)
    if not report.passed:
        raise GradientMismatchError(report)
    return report


def check_variants(loss_fn: Any, model: Any, batch: Any, **kwargs: Any) -> CheckReport:
    """:func:`gradcheck.properties.variants.check_variants`: gradients under
    torch.compile, autocast and other devices against eager execution."""
    from gradcheck.properties import variants

    return variants.check_variants(loss_fn, model, batch, **kwargs)


def assert_variants(loss_fn: Any, model: Any, batch: Any, **kwargs: Any) -> CheckReport:
    """Like :func:`check_variants`; raises GradientMismatchError on failure."""
    from gradcheck.properties import variants

    return variants.assert_variants(loss_fn, model, batch, **kwargs)
