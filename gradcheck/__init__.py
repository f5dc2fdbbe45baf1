"""gradcheck: are your gradients right?

Checks framework gradients against finite differences (float32 and float64,
PyTorch and TensorFlow/Keras) and the linearity of weighted multi-head losses.
Importing gradcheck imports no framework; a backend loads when its tensors appear.
"""

from gradcheck.api import (
    assert_cross_framework,
    assert_gradients,
    assert_linearity,
    assert_locality,
    check_cross_framework,
    check_gradients,
    check_linearity,
    check_locality,
)
from gradcheck.errors import (
    FrameworkNotInstalledError,
    GradcheckError,
    GradientMismatchError,
    InvalidArgumentError,
    MixedFrameworksError,
    NonFiniteError,
    NothingToDifferentiateError,
    ShapeChangedError,
    UnsupportedInputError,
)
from gradcheck.result import CheckReport, FlowMatrix, Location, TensorResult

__version__ = "0.1.0"

__all__ = [
    "CheckReport",
    "FlowMatrix",
    "FrameworkNotInstalledError",
    "GradcheckError",
    "GradientMismatchError",
    "InvalidArgumentError",
    "Location",
    "MixedFrameworksError",
    "NonFiniteError",
    "NothingToDifferentiateError",
    "ShapeChangedError",
    "TensorResult",
    "UnsupportedInputError",
    "__version__",
    "assert_cross_framework",
    "assert_gradients",
    "assert_linearity",
    "assert_locality",
    "check_cross_framework",
    "check_gradients",
    "check_linearity",
    "check_locality",
]
