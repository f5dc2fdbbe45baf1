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
    DeviceUnavailableError,
    FrameworkNotInstalledError,
    GradcheckError,
    GradientMismatchError,
    InvalidArgumentError,
    MixedFrameworksError,
    NoGradientError,
    NonFiniteError,
    NothingToDifferentiateError,
    ShapeChangedError,
    UnsupportedInputError,
)
from gradcheck.keras_api import assert_keras_model, check_keras_model
from gradcheck.models import check_model
from gradcheck.properties.devices import assert_devices, check_devices
from gradcheck.properties.distributed import assert_distributed, check_distributed
from gradcheck.properties.variants import assert_variants, check_variants
from gradcheck.result import CheckReport, FlowMatrix, Location, TensorResult
from gradcheck.training_api import assert_training_step, check_training_step

__version__ = "0.1.0"

__all__ = [
    "CheckReport",
    "DeviceUnavailableError",
    "FlowMatrix",
    "FrameworkNotInstalledError",
    "GradcheckError",
    "GradientMismatchError",
    "InvalidArgumentError",
    "Location",
    "MixedFrameworksError",
    "NoGradientError",
    "NonFiniteError",
    "NothingToDifferentiateError",
    "ShapeChangedError",
    "TensorResult",
    "UnsupportedInputError",
    "__version__",
    "assert_cross_framework",
    "assert_devices",
    "assert_distributed",
    "assert_gradients",
    "assert_keras_model",
    "assert_linearity",
    "assert_locality",
    "assert_training_step",
    "assert_variants",
    "check_cross_framework",
    "check_devices",
    "check_distributed",
    "check_gradients",
    "check_keras_model",
    "check_linearity",
    "check_locality",
    "check_model",
    "check_training_step",
    "check_variants",
]
