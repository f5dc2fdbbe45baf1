"""Errors raised by gradcheck.

Two families:

* :class:`GradcheckError` and its subclasses: the check could not be run because the
  input is unusable. The message names the problem and the fix.
* :class:`GradientMismatchError` (an ``AssertionError``): the check ran and the
  gradients are wrong. Raised by the ``assert_*`` functions; carries the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from gradcheck.result import CheckReport

__all__ = [
    "GradcheckError",
    "InvalidArgumentError",
    "UnsupportedInputError",
    "NothingToDifferentiateError",
    "NonFiniteError",
    "MixedFrameworksError",
    "ShapeChangedError",
    "FrameworkNotInstalledError",
    "DeviceUnavailableError",
    "NoGradientError",
    "NotCompiledError",
    "ClassWeightError",
    "KerasStepError",
    "GradientMismatchError",
]


class GradcheckError(Exception):
    """Base class: a check could not be run on this input."""


class InvalidArgumentError(GradcheckError, ValueError):
    """An option or argument has an impossible value."""


class UnsupportedInputError(GradcheckError, TypeError):
    """``fn`` or its inputs are of a kind gradcheck cannot check."""


class NothingToDifferentiateError(GradcheckError):
    """No floating tensor that requires a gradient was found."""


class NonFiniteError(GradcheckError):
    """The function returned NaN or Inf, or produced a NaN/Inf gradient."""


class MixedFrameworksError(GradcheckError):
    """Inputs or parameters come from more than one framework."""


class ShapeChangedError(GradcheckError):
    """The function's outputs changed shape or structure between two calls."""


class FrameworkNotInstalledError(GradcheckError, ImportError):
    """A backend's framework is not importable."""


class NoGradientError(GradcheckError):
    """A training step left no ``.grad`` on any parameter although the losses have a
    gradient: backward() never ran, or a zero_grad() after it cleared the result."""


class DeviceUnavailableError(GradcheckError):
    """A requested device (a GPU, ``"cuda:1"``, ``"/GPU:0"``) does not exist here."""


class GradientMismatchError(AssertionError):
    """A gradient check failed. ``.report`` holds the full :class:`CheckReport`."""

    def __init__(self, report: CheckReport):
        self.report = report
        super().__init__(report.message())


class NotCompiledError(GradcheckError):
    """A Keras model was not compiled (or compiled without ``loss=``), so there is
    no train step, or no loss configuration, to check."""


class ClassWeightError(InvalidArgumentError):
    """``class_weight`` was given for a model with several outputs: Keras maps one
    class table onto one target only."""


class KerasStepError(GradcheckError):
    """Keras' own train step (``train_on_batch``) raised on the given data."""


class FunctionRaisedError(GradcheckError):
    """The checked function (``fn``, a ``loss_fns`` entry, ``total_fn``) raised.

    Raised by :func:`wrap_exception`, whose instances are also of the original
    exception's type where Python allows it (``except ValueError`` in user code
    still catches a ``ValueError`` from ``fn``); the original is ``__cause__``."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError and friends would repr() the message
        return self.message

    def __reduce__(self):  # combined classes are made at run time: rebuild them
        base = next(b for b in type(self).__mro__ if b in _WRAPPERS)
        original = next(
            (b for b in type(self).__bases__ if not issubclass(b, GradcheckError)),
            None,
        )
        return (_rebuild, (base, original, self.message, dict(vars(self))))


class BackwardError(FunctionRaisedError):
    """The framework's backward pass through the checked function raised (a custom
    backward, a hook, a tensor modified in place after autograd saved it)."""


class ReferencePrecisionError(FunctionRaisedError):
    """The function ran on float64 copies but its backward could not: gradcheck
    needs that float64 gradient to tell low-precision rounding from a bug."""


class FrameworkError(FunctionRaisedError):
    """The framework raised inside gradcheck's own work on a valid-looking input;
    the message says what gradcheck was doing."""


_WRAPPERS = (
    FunctionRaisedError,
    BackwardError,
    ReferencePrecisionError,
    FrameworkError,
)
_COMBINED: dict[tuple[type, type], type] = {}


def _combined(cls: type, original: type) -> type:
    """``cls`` combined with ``original`` (made once per pair), or ``cls`` where
    Python cannot combine them (incompatible layouts, a final class)."""
    combined = _COMBINED.get((cls, original))
    if combined is None:
        combined = cls
        if not issubclass(original, GradcheckError):
            try:
                combined = type(
                    cls.__name__, (cls, original), {"__module__": cls.__module__}
                )
            except TypeError:
                pass
        _COMBINED[cls, original] = combined
    return combined


def _make(combined: type, cls: type, message: str, state: dict) -> FunctionRaisedError:
    try:
        err = combined(message)
        err.__dict__.update({k: v for k, v in state.items() if k != "message"})
    except Exception:  # the original type's constructor refused: plain cls
        err = cls(message)
    return err


def _rebuild(
    cls: type, original: type | None, message: str, state: dict
) -> FunctionRaisedError:
    combined = cls if original is None else _combined(cls, original)
    return _make(combined, cls, message, state)


def wrap_exception(
    cls: type[FunctionRaisedError], exc: BaseException, message: str
) -> FunctionRaisedError:
    """An instance of ``cls`` carrying ``message`` that is also an instance of
    ``type(exc)`` when the two classes can be combined (``exc``'s attributes are
    copied over), else a plain ``cls``. Raise it ``from exc``. Picklable: the
    combined class is rebuilt on unpickling."""
    combined = _combined(cls, type(exc))
    state = dict(vars(exc)) if combined is not cls else {}
    return _make(combined, cls, message, state)
