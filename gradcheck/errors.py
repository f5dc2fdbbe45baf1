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
