"""The devices property: the same model, weights and batch give the same gradients
on every device (CPU and GPUs), within the rounding the device's precision allows.

:func:`check_devices` is the device-only form of
:func:`gradcheck.check_variants`: each device named is a variant, and the one
engine of :mod:`gradcheck.properties.variants` measures and judges it - copies of
the model and batch per device (torch) or the user's model under ``tf.device``
(TensorFlow/Keras), the eager reference on the first device (float64 for a
float32 or half torch model), the tolerance measured from the device's precision
(TF32 where it is in play, re-measured with TF32 off), every device evaluated
twice for nondeterminism and the ops behind it named, every piece of the user's
state put back. See that module for the details; what this one decides:

* **The reference** is the eager gradient on the first device named (the CPU for
  ``devices="auto"``), in float64 where the model is float32 or half (torch).
  Every device named, the first included, is compared with it: a device whose
  gradient is off is named, and a precision bug that every device shares shows
  on every device instead of passing as "the devices agree" (the old elementwise
  device-vs-device comparison could not tell those apart).
* **Absent devices are skipped, not failed** (the rule of check_variants): a GPU
  is hardware the machine has or not, not a property of the model, so the same
  suite runs on CPU-only CI and on GPU machines. When no device besides the
  reference can run here (``"auto"`` or ``("cpu", "cuda:0")`` without a GPU) the
  report's status is ``"skipped"`` with the reason in its notes and nothing is
  evaluated but the reference (so a broken loss_fn still raises on CPU-only CI);
  ``assert_devices`` does not raise on it. A request that can never compare two
  devices is an error whatever the machine (``devices=("cpu",)``, or ``"cuda"``
  - the GPUs among themselves - where there is at most one):
  :class:`~gradcheck.errors.DeviceUnavailableError`.
* **rtol** replaces the measured tolerance per tensor:
  ``||g_device - g_ref|| <= rtol * ||g_ref||`` (the old elementwise meaning of
  "replaces the dtype's rounding" cannot be kept by a norm-wise engine; the
  norm-wise one is what check_variants does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradcheck import devices as dv
from gradcheck.errors import DeviceUnavailableError
from gradcheck.properties import variants as pv
from gradcheck.result import CheckReport

__all__ = ["PROPERTY", "assert_devices", "check_devices", "run"]

PROPERTY = "devices"


def check_devices(
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    batch: Any,
    *,
    devices: str | Sequence[str] = "auto",
    seed: int | None = None,
    rtol: float | None = None,
    label: str | None = None,
    repro_dir: Any = None,
) -> CheckReport:
    """Check that ``model``'s gradients agree across devices.

    ``loss_fn(model, batch)`` returns the scalar loss; it must use the model and
    batch it is given (gradcheck hands it a copy on each device for torch).
    ``devices``: "auto"/"all" (the CPU and every GPU), "cuda"/"gpu" (every GPU),
    one device or a sequence of them (``("cpu", "cpu")`` runs the whole machinery
    on the CPU alone); the first is the reference device. Every trainable
    parameter's gradient on each device is compared, tensor by tensor, with the
    eager reference on the first device (float64 for a float32 torch model),
    within the rounding measured for the device's precision (TF32 included).
    ``seed`` seeds torch's CPU and GPU generators before every evaluation
    (restored afterwards); ``rtol`` replaces the measured tolerance
    (``||g - r|| <= rtol ||r||`` per tensor). Devices that are not here are
    skipped (status ``"skipped"`` when nothing is left to compare). Returns a
    report with property ``"devices"``; see the module docstrings (this one and
    :mod:`gradcheck.properties.variants`) for TF32 and nondeterminism.

    ``repro_dir``: a failing check writes a repro bundle there (the request as
    given: a replay without the GPU says "not reproduced: skipped (no GPU
    here: ...)"). Default: the pytest plugin's ``--gradcheck-repro-dir``."""
    return pv.front_door(
        "check_devices",
        lambda s: run(loss_fn, model, batch, devices=devices, seed=s, rtol=rtol),
        loss_fn,
        model,
        batch,
        request=devices,
        seed=seed,
        rtol=rtol,
        label=label,
        repro_dir=repro_dir,
    )


def assert_devices(
    loss_fn: Callable[[Any, Any], Any], model: Any, batch: Any, **kwargs: Any
) -> CheckReport:
    """Like :func:`check_devices`; raises :class:`GradientMismatchError` on failure
    (not when it was skipped: no second device here)."""
    return pv.raise_on_failure(check_devices(loss_fn, model, batch, **kwargs))


def run(
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    batch: Any,
    *,
    devices: str | Sequence[str] = "auto",
    seed: int = 0,
    rtol: float | None = None,
) -> CheckReport:
    """The engine behind :func:`check_devices` (no seed resolution, no listeners)."""
    names: list[str] = []

    def plan(driver: Any) -> tuple[list[pv.Variant], str]:
        names.extend(requested(driver.framework, devices))
        reference, others = names[0], names[1:]
        each = [pv.Variant(n, device=n) for n in dict.fromkeys(names)]
        if all(driver.unavailable(pv.Variant(n, device=n)) for n in others):
            # nothing to compare the reference device with: skip, do not pass
            # on the reference device's own comparison alone
            each = [v for v in each if v.name in others]
        return each, reference

    return pv.evaluate(
        loss_fn,
        model,
        batch,
        plan,
        seed=seed,
        rtol=rtol,
        prop=PROPERTY,
        noun="device",
        describe=lambda ref: f"{ref} vs {', '.join(names[1:])}",
    )


def requested(framework: str, devices: Any) -> list[str]:
    """The devices a request names, in ``framework``'s spelling, the reference
    first, repeats kept; absent GPUs stay in (they are skipped, see the module
    docstring), and "auto"/"all"/"cuda" on a machine without a GPU name the first
    GPU, which is then reported skipped with the reason. Raises
    DeviceUnavailableError for a request of fewer than two devices."""
    items = [devices] if isinstance(devices, str) else devices
    if type(devices).__name__ in ("device", "DeviceSpec"):  # torch.device & co.
        items = [str(devices)]
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        return dv.resolve(framework, devices)  # raises the clear error
    if not items:
        dv.resolve(framework, ())  # "devices is an empty sequence" error
    first_gpu = dv.normalize(framework, "cuda")
    names: list[str] = []
    for item in items:
        key = str(item).strip().lower()
        if key in ("auto", "all"):
            found = dv.available_devices(framework)
            names.extend(found if len(found) > 1 else [*found, first_gpu])
        elif key in ("cuda", "gpu", "/gpu"):
            names.extend(dv.available_devices(framework)[1:] or [first_gpu])
        else:
            if not isinstance(item, str) and type(item).__name__ != "device":
                dv.resolve(framework, [item])  # "entries are device names" error
            names.append(dv.normalize(framework, str(item)))
    if len(names) < 2:
        gpus = dv.available_devices(framework)[1:]
        raise DeviceUnavailableError(
            f"devices={devices!r} gives only {names}: comparing devices needs at "
            "least two. "
            + (
                dv._no_gpu_message(framework, str(devices))
                if names == [first_gpu] and not gpus
                else "Name two or more, e.g. ('cpu', 'cuda:0'), or ('cpu', 'cpu') "
                "to exercise the check on the CPU alone."
            )
        )
    return names
