"""Which devices a framework can compute on, what a device request means, and
whether TensorFloat-32 is in play on a device.

Nothing here imports torch or TensorFlow when ``gradcheck.devices`` is imported: a
function imports its framework when it is called for that framework (and raises
:class:`~gradcheck.errors.FrameworkNotInstalledError` if it is missing), and
:func:`environment` without arguments describes only frameworks the process has
already imported.

Device names are the ones the framework itself accepts, so a name from a report can
be pasted back into user code:

* torch: ``"cpu"`` and ``"cuda:N"``;
* TensorFlow: ``"/CPU:0"`` and ``"/GPU:N"`` (logical devices, what ``tf.device``
  takes).

Requests are forgiving about spelling: ``"cuda:0"``, ``"gpu:0"``, ``"/GPU:0"``,
``"/device:GPU:0"`` and TensorFlow's full ``"/job:localhost/.../device:GPU:0"`` all
name the first GPU in either framework; :func:`normalize` turns any of them into the
framework's own spelling.

TF32: Ampere and newer NVIDIA GPUs (compute capability >= 8.0) can run float32
matrix multiplications and convolutions on tensor cores with operands rounded to a
10-bit mantissa. TensorFlow enables it by default for both; PyTorch by default only
for cuDNN convolutions (and cuDNN RNNs), not for matmuls
(``torch.get_float32_matmul_precision() == "highest"``). :func:`tf32_state` reports
the setting, the hardware and whether the two together put TF32 in play.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gradcheck.errors import (
    DeviceUnavailableError,
    FrameworkNotInstalledError,
    InvalidArgumentError,
)

__all__ = [
    "FRAMEWORKS",
    "TF32_MIN_CAPABILITY",
    "available_devices",
    "canonical",
    "environment",
    "is_gpu",
    "known_gpu",
    "normalize",
    "resolve",
    "tf32_note",
    "tf32_state",
]

FRAMEWORKS = ("torch", "tensorflow")

#: TF32 tensor cores arrived with Ampere (sm_80).
TF32_MIN_CAPABILITY = (8, 0)

_ALIASES = {
    "torch": "torch",
    "pytorch": "torch",
    "tensorflow": "tensorflow",
    "tf": "tensorflow",
}

# "/job:localhost/replica:0/task:0/device:GPU:0", "/device:GPU:0", "/GPU:0",
# "gpu:0", "cuda:0", "cuda", "cpu", "CPU:0" ...
_DEVICE_RE = re.compile(
    r"(?:/job:[^/]+(?:/replica:\d+)?(?:/task:\d+)?)?/?(?:device:)?"
    r"(cpu|gpu|cuda)(?::(\d+))?"
)


def _framework(framework: str) -> str:
    fw = _ALIASES.get(str(framework).strip().lower())
    if fw is None:
        raise InvalidArgumentError(
            f"framework must be one of {FRAMEWORKS}; got {framework!r}."
        )
    return fw


def _import(framework: str) -> Any:
    module = "torch" if framework == "torch" else "tensorflow"
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FrameworkNotInstalledError(
            f"{module} is not importable ({exc}); install it to use {framework} "
            "devices (pip install 'gradcheck[" + framework + "]')."
        ) from exc


def _cpu(framework: str) -> str:
    return "cpu" if framework == "torch" else "/CPU:0"


def _gpu(framework: str, index: int) -> str:
    return f"cuda:{index}" if framework == "torch" else f"/GPU:{index}"


def _parse(device: Any) -> tuple[str, int | None]:
    """('cpu' | 'gpu', index or None) for any spelling of a device."""
    text = str(device).strip()
    m = _DEVICE_RE.fullmatch(text.lower())
    if m is None:
        raise InvalidArgumentError(
            f"{text!r} is not a device gradcheck knows: use 'cpu', 'cuda:N' (torch) "
            "or '/CPU:0', '/GPU:N' (TensorFlow), or one of the requests 'auto', "
            "'all', 'cpu', 'cuda'."
        )
    kind, index = m.groups()
    return ("cpu" if kind == "cpu" else "gpu"), (None if index is None else int(index))


def normalize(framework: str, device: Any) -> str:
    """The framework's own spelling of one device (``"gpu:1"`` -> ``"cuda:1"`` for
    torch, ``"/GPU:1"`` for TensorFlow). A bare ``"cuda"``/``"gpu"`` means the first
    GPU, as ``torch.device("cuda")`` does."""
    fw = _framework(framework)
    kind, index = _parse(device)
    if kind == "cpu":
        return _cpu(fw)
    return _gpu(fw, 0 if index is None else index)


def is_gpu(device: Any) -> bool:
    """True for a GPU device name in either framework's spelling."""
    return _parse(device)[0] == "gpu"


def canonical(framework: str, device: Any) -> str:
    """:func:`normalize` for a device gradcheck knows; any other device torch has
    (``"mps"``, ``"xpu:0"``, ...) by its name as given, which :func:`known_gpu`
    then does not count as a (CUDA) GPU: a model living there is still checked
    there, without CUDA's TF32 and generator handling."""
    try:
        return normalize(framework, device)
    except InvalidArgumentError:
        return str(device)


def known_gpu(device: Any) -> bool:
    """:func:`is_gpu`, False for a device name gradcheck does not know."""
    try:
        return is_gpu(device)
    except InvalidArgumentError:
        return False


def _gpu_index(device: Any) -> int:
    kind, index = _parse(device)
    if kind != "gpu":
        raise InvalidArgumentError(f"{device!r} is not a GPU device.")
    return 0 if index is None else index


# ---------------------------------------------------------------------- discovery
def _torch_gpu_count(torch: Any) -> int:
    # device_count() does not create a CUDA context
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _tf_gpu_count(tf: Any) -> int:
    return len(tf.config.list_logical_devices("GPU"))


def available_devices(framework: str) -> list[str]:
    """Every device the framework can compute on here, CPU first.

    torch: ``["cpu", "cuda:0", ...]``; TensorFlow: ``["/CPU:0", "/GPU:0", ...]``.
    Imports the framework."""
    fw = _framework(framework)
    mod = _import(fw)
    n = _torch_gpu_count(mod) if fw == "torch" else _tf_gpu_count(mod)
    return [_cpu(fw)] + [_gpu(fw, i) for i in range(n)]


def _no_gpu_message(fw: str, request: str) -> str:
    if fw == "torch":
        torch = sys.modules.get("torch")
        build = getattr(getattr(torch, "version", None), "cuda", None)
        why = (
            f"this torch ({getattr(torch, '__version__', '?')}) is a CPU-only build"
            if torch is not None and build is None
            else "torch.cuda.is_available() is False (no NVIDIA driver or GPU "
            "visible; check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
    else:
        why = (
            "tf.config.list_logical_devices('GPU') is empty (tensorflow-cpu, no "
            "driver, or CUDA_VISIBLE_DEVICES hides the GPUs)"
        )
    return (
        f"devices={request!r} asks for a GPU, but {fw} sees none: {why}. Run on a "
        "machine with an NVIDIA GPU and a CUDA build of the framework; to exercise "
        "the check on CPU alone pass devices=('cpu', 'cpu'), and in a test suite "
        f"skip when gradcheck.devices.available_devices({fw!r}) has no GPU."
    )


def resolve(framework: str, request: str | Sequence[str] = "auto") -> list[str]:
    """The devices a request names, in the framework's spelling, CPU first.

    * ``"auto"``: every available device (just the CPU on a machine without GPU);
    * ``"all"``: the CPU and every GPU; a GPU must exist (the caller asked for a
      cross-device comparison) - :class:`DeviceUnavailableError` otherwise;
    * ``"cpu"``: the CPU;
    * ``"cuda"`` / ``"gpu"``: every GPU, and at least one must exist;
    * one device (``"cuda:1"``, ``"/GPU:0"``): that device, which must exist;
    * a sequence of any of these: their concatenation, in order, repeats kept
      (``("cpu", "cpu")`` runs the cross-device machinery on the CPU alone).
    """
    fw = _framework(framework)
    if isinstance(request, str):
        return _resolve_one(fw, request)
    if isinstance(request, Sequence) and not isinstance(request, (bytes, bytearray)):
        if not request:
            raise InvalidArgumentError(
                "devices is an empty sequence; name at least one device."
            )
        out: list[str] = []
        for item in request:
            if not isinstance(item, str) and type(item).__name__ != "device":
                raise InvalidArgumentError(
                    f"devices entries are device names (str); got {item!r}."
                )
            out.extend(_resolve_one(fw, str(item)))
        return out
    if type(request).__name__ in ("device", "DeviceSpec"):  # torch.device & co.
        return _resolve_one(fw, str(request))
    raise InvalidArgumentError(
        "devices must be 'auto', 'all', 'cpu', 'cuda', a device name or a sequence "
        f"of them; got {type(request).__name__}."
    )


def _resolve_one(fw: str, request: str) -> list[str]:
    key = request.strip().lower()
    if key in ("auto", "all"):
        devices = available_devices(fw)
        if key == "all" and len(devices) < 2:
            raise DeviceUnavailableError(_no_gpu_message(fw, request))
        return devices
    if key in ("cuda", "gpu", "/gpu"):
        gpus = available_devices(fw)[1:]
        if not gpus:
            raise DeviceUnavailableError(_no_gpu_message(fw, request))
        return gpus
    name = normalize(fw, request)
    if name == _cpu(fw):
        return [name]
    available = available_devices(fw)
    if name not in available:
        if len(available) == 1:
            raise DeviceUnavailableError(_no_gpu_message(fw, request))
        raise DeviceUnavailableError(
            f"{request!r} is not a device {fw} has here; available: "
            f"{', '.join(available)}. Pick one of those (GPU indices count from 0 "
            "among the visible GPUs, after CUDA_VISIBLE_DEVICES)."
        )
    return [name]


# ---------------------------------------------------------------------- TF32
def _try(read: Callable[[], Any]) -> Any:
    """A setting's value, or None where reading it raises (torch refuses to read
    a legacy TF32 flag once the new fp32_precision API has set a conflicting one)."""
    try:
        return read()
    except Exception:
        return None


def _reduced(new: Any, legacy: Any) -> bool | None:
    """Whether an fp32 op family may use TF32: the new per-op ``fp32_precision``
    ("tf32"/"ieee", "none" = not set) decides if set, else the legacy flag."""
    if isinstance(new, str) and new not in ("none", ""):
        return new != "ieee"
    if legacy is None:
        return None
    if isinstance(legacy, str):  # torch.get_float32_matmul_precision()
        return legacy != "highest"
    return bool(legacy)


def torch_tf32_settings() -> dict[str, Any]:
    """torch's TF32 switches as set now (no CUDA initialisation): the raw readings
    and, per kernel family, whether TF32 is allowed (None: unreadable)."""
    torch = _import("torch")
    cudnn = torch.backends.cudnn
    raw = {
        "torch.backends.cuda.matmul.fp32_precision": _try(
            lambda: torch.backends.cuda.matmul.fp32_precision
        ),
        "torch.get_float32_matmul_precision()": _try(
            torch.get_float32_matmul_precision
        ),
        "torch.backends.cuda.matmul.allow_tf32": _try(
            lambda: torch.backends.cuda.matmul.allow_tf32
        ),
        "torch.backends.cudnn.conv.fp32_precision": _try(
            lambda: cudnn.conv.fp32_precision
        ),
        "torch.backends.cudnn.rnn.fp32_precision": _try(
            lambda: cudnn.rnn.fp32_precision
        ),
        "torch.backends.cudnn.allow_tf32": _try(lambda: cudnn.allow_tf32),
        "torch.backends.cudnn.enabled": _try(lambda: cudnn.enabled),
    }
    legacy_mm = raw["torch.get_float32_matmul_precision()"]
    if legacy_mm is None:
        legacy_mm = raw["torch.backends.cuda.matmul.allow_tf32"]
    cudnn_on = raw["torch.backends.cudnn.enabled"] is not False
    legacy_cudnn = raw["torch.backends.cudnn.allow_tf32"]
    return {
        "raw": raw,
        "matmul": _reduced(raw["torch.backends.cuda.matmul.fp32_precision"], legacy_mm),
        "convolution": cudnn_on
        and _reduced(raw["torch.backends.cudnn.conv.fp32_precision"], legacy_cudnn),
        "rnn": cudnn_on
        and _reduced(raw["torch.backends.cudnn.rnn.fp32_precision"], legacy_cudnn),
    }


def _torch_capability(torch: Any, index: int) -> tuple[int, int] | None:
    try:
        major, minor = torch.cuda.get_device_capability(index)
        return int(major), int(minor)
    except Exception:
        return None


def _tf_capability(tf: Any, index: int) -> tuple[int, int] | None:
    """Compute capability of logical GPU ``index``. Logical and physical GPUs match
    one to one unless virtual devices were configured; then all must agree."""
    try:
        physical = tf.config.list_physical_devices("GPU")
        logical = tf.config.list_logical_devices("GPU")
        caps = {
            tuple(
                tf.config.experimental.get_device_details(p).get("compute_capability")
            )
            for p in physical
        }
        if len(physical) == len(logical) and index < len(physical):
            cap = tf.config.experimental.get_device_details(physical[index]).get(
                "compute_capability"
            )
            return None if cap is None else (int(cap[0]), int(cap[1]))
        if len(caps) == 1:
            (cap,) = caps
            return int(cap[0]), int(cap[1])
    except Exception:
        return None
    return None


def tf32_state(framework: str, device: str) -> dict[str, Any]:
    """Whether TF32 is in play for float32 kernels on ``device``, and why.

    Keys: ``framework``, ``device``; ``gpu`` (a GPU device); ``compute_capability``
    (``"8.0"``, None on CPU or when unknown); ``tf32_capable`` (compute capability
    >= 8.0); ``settings`` (the raw switches, by their API names);
    ``matmul`` / ``convolution`` / ``rnn`` (TF32 in play for that kernel family:
    allowed by the switches *and* a capable GPU); ``in_play`` (any of them);
    ``reason`` (one sentence). On a CPU TF32 is never in play; the switches are
    still reported. A TF32-capable GPU whose switch cannot be read counts as in
    play (``allowed`` None): a wider tolerance is the safe side there, because the
    device check re-measures with TF32 off before it blames or clears TF32.
    """
    fw = _framework(framework)
    mod = _import(fw)
    name = normalize(fw, device)
    gpu = is_gpu(name)
    if fw == "torch":
        settings = torch_tf32_settings()
        allowed = {k: settings[k] for k in ("matmul", "convolution", "rnn")}
        raw = settings["raw"]
        cap = _torch_capability(mod, _gpu_index(name)) if gpu else None
    else:
        enabled = _try(mod.config.experimental.tensor_float_32_execution_enabled)
        allowed = {"matmul": enabled, "convolution": enabled, "rnn": enabled}
        raw = {"tf.config.experimental.tensor_float_32_execution_enabled()": enabled}
        cap = _tf_capability(mod, _gpu_index(name)) if gpu else None
    # unknown capability on a GPU: assume TF32 possible (the safe side, see above)
    capable = bool(gpu and (cap is None or cap >= TF32_MIN_CAPABILITY))
    families = {k: bool(capable and v is not False) for k, v in allowed.items()}
    in_play = any(families.values())
    cap_text = None if cap is None else f"{cap[0]}.{cap[1]}"
    if not gpu:
        reason = "TF32 is a GPU tensor-core mode; it never applies on the CPU."
    elif cap is None:
        reason = (
            f"{name}'s compute capability is unknown; TF32 is assumed possible "
            f"({'allowed' if in_play else 'switched off'} by the settings)."
        )
    elif not capable:
        reason = (
            f"{name} (compute capability {cap_text}) predates Ampere: no TF32 "
            "tensor cores, float32 kernels run in full float32."
        )
    elif in_play:
        on = [k for k, v in families.items() if v]
        reason = (
            f"TF32 is in play on {name} (compute capability {cap_text}) for float32 "
            f"{'/'.join(on)} kernels: operands are rounded to a 10-bit mantissa."
        )
    else:
        reason = f"TF32 is switched off on {name} (compute capability {cap_text})."
    return {
        "framework": fw,
        "device": name,
        "gpu": gpu,
        "compute_capability": cap_text,
        "tf32_capable": capable,
        "settings": raw,
        "allowed": allowed,
        **families,
        "in_play": in_play,
        "reason": reason,
    }


def tf32_note(framework: str, device: str, dtypes: Sequence[str]) -> str | None:
    """A report note for a check whose float32 tensors live on ``device`` while TF32
    is in play there, else None. The finite-difference and linearity tolerances are
    float32's; TF32 rounds matmul/convolution operands to ~5e-4, so a mismatch of
    about 1e-3 relative on such a device may be TF32's, not a gradient bug."""
    if "float32" not in dtypes or not is_gpu(device):
        return None
    state = tf32_state(framework, device)
    if not state["in_play"]:
        return None
    off = (
        "torch.backends.cuda.matmul.fp32_precision = 'ieee' and "
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'"
        if state["framework"] == "torch"
        else "tf.config.experimental.enable_tensor_float_32_execution(False)"
    )
    return (
        f"{state['reason']} The analytical gradients carry TF32 rounding (about 1e-3 "
        f"relative), more than float32's; if this check fails by about that much, "
        f"rerun with TF32 off ({off}) or use check_devices, which accounts for it."
    )


# ---------------------------------------------------------------------- reports
def environment(frameworks: Sequence[str] | None = None) -> dict[str, Any]:
    """A JSON-able description of the devices and their TF32 state, for reports.

    ``frameworks=None`` describes the frameworks this process has already imported
    (never importing one just to describe it); name them to import them."""
    if frameworks is None:
        names = [fw for fw in FRAMEWORKS if fw in sys.modules]
    else:
        names = [_framework(fw) for fw in frameworks]
    out: dict[str, Any] = {}
    for fw in names:
        mod = _import(fw)
        devices = available_devices(fw)
        entry: dict[str, Any] = {
            "version": str(getattr(mod, "__version__", "?")),
            "devices": devices,
            "tf32": {d: tf32_state(fw, d) for d in devices},
        }
        if fw == "torch":
            entry["cuda_build"] = getattr(mod.version, "cuda", None)
            entry["deterministic_algorithms"] = bool(
                mod.are_deterministic_algorithms_enabled()
            )
            entry["deterministic_warn_only"] = bool(
                mod.is_deterministic_algorithms_warn_only_enabled()
            )
        else:
            entry["built_with_cuda"] = bool(mod.test.is_built_with_cuda())
            entry["op_determinism"] = _tf_op_determinism()
        out[fw] = entry
    return {"frameworks": out}


def _tf_op_determinism() -> bool | None:
    try:
        from tensorflow.python.framework import config as tf_config

        return bool(tf_config.is_op_determinism_enabled())
    except Exception:
        return None
