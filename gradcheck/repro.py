"""Repro bundles: a failing check written down as data, and ``gradcheck replay``.

A *bundle* is a directory a person can read and a machine can rerun::

    <slug>-<hash>/
      bundle.json    format, the call (entry point, spec or function name, options,
                     seed, dtype, property), the verdict, library versions, the
                     CPU, when; every data file with its sha256 and its arrays
      report.json    the full CheckReport (CheckReport.to_dict())
      README.txt     what failed and how to replay it
      inputs.npz     the inputs (tensors as NumPy arrays; their framework, dtype,
                     requires_grad and device are in bundle.json); a training
                     step's global tensors; a Keras step's x, y, sample weights
      weights.npz    a model's state_dict / Keras weights, when there is a model
      batch.npz      an audit example's batch; a cross-framework check's batch

Design choices, and why:

* **Data, never code.** Arrays are ``.npz`` written by NumPy and read with
  ``allow_pickle=False``; everything else is JSON. No pickle, no ``torch.load``:
  loading a bundle cannot run anything from it. What a replay runs is named by
  the bundle and imported from *this* machine: the user's own module
  (``package.module:callable``, ``module:function``, a model class), a
  transformers config or a Keras application, or one of gradcheck's audit jobs.
  Names in the standard library are refused (a tampered bundle cannot point
  ``fn`` at ``os:system``).
* **Only failing verdicts are written**: ``mismatch``, ``nondifferentiable`` and
  ``nondeterministic`` (:data:`WRITTEN`): the check ran and judged the
  gradients, so there is a verdict to reproduce. ``unbuildable``, ``timeout`` and
  ``error`` reached none (their reason is in the report's note, and is about this
  machine); a passing check has nothing to reproduce.
* **What replays**: ``check_model`` on a spec (``hf:``, ``keras:``,
  ``module:callable``), rebuilt from the spec with the stored weights loaded
  over it (shapes verified), so a change in a framework's initialisers cannot
  hide the failure; ``check_model`` on a torch model object whose class is
  importable and constructible with no arguments; ``check_gradients`` /
  ``assert_gradients`` when ``fn`` is importable by ``module:qualname`` (or is the
  ``params`` module itself, or one of its methods) and ``params`` is an
  ``nn.Module`` that is importable (a module-level object of ``fn``'s module) or
  rebuildable (its class, no-argument constructor, then the stored state_dict);
  ``check_linearity`` / ``check_locality`` likewise, with every loss function
  named and ``expected`` as JSON; ``check_training_step`` when ``step_fn`` and
  the loss functions are importable and the model is a module-level object of
  ``step_fn``'s module (the torch tensors they read from their module's globals,
  the batch, are stored and put back for the replay); ``check_keras_model``
  from Keras' JSON and compile configs (deserialized in safe mode), the weights
  and the batch, custom classes named by ``module:qualname``;
  ``check_variants`` / ``check_devices`` when ``loss_fn`` is importable (or a
  method of the model) and the model is a module-level object of its module or
  rebuildable from its class (torch: state_dict, train/eval flags, frozen
  parameters) or a Keras model (its JSON config and weights), with the batch and
  the request as given (a GPU variant on a machine without one replays as
  ``not reproduced: skipped (no GPU here: ...)``, never as a pass);
  ``check_distributed`` (``build`` and ``step`` importable by contract, the
  global batch, world size, backend, wrap); ``check_cross_framework`` (the
  spec as data, the batch); audit examples (the job by name, the generated architecture spec, its batch
  and seed: the same model and the same planted bug). Anything else is still
  written, with ``"replayable": false`` and the reason, which ``gradcheck
  replay`` prints (exit 2).
* **Names are deterministic and safe**: a slug of the label (model, property,
  dtype) plus 10 hex digits of a hash of the call, its data and the verdict. The
  same failure written twice finds its bundle already there and keeps it; a
  different bundle under a taken name gets ``-2``, ``-3``: nothing is ever
  overwritten. A bundle appears whole or not at all (written beside, renamed).
* **Replay verdict**: the rerun's status against the recorded one: ``reproduced:
  mismatch`` or ``not reproduced: passed, versions differ in torch: bundle X,
  here Y``. Version differences are always listed, reproduced or not.

Importing this module imports no framework; each function imports what it needs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcheck.errors import GradcheckError
from gradcheck.result import CheckReport

__all__ = [
    "FORMAT",
    "WRITTEN",
    "ReplayResult",
    "ReproBundleError",
    "load",
    "replay",
    "session_dir",
    "set_session_dir",
    "write_audit_bundle",
    "write_cross_framework_bundle",
    "write_distributed_bundle",
    "write_gradients_bundle",
    "write_model_bundle",
    "write_variants_bundle",
]

FORMAT = "gradcheck-repro/1"
BUNDLE_FILE = "bundle.json"
#: statuses that write a bundle: the check reached a verdict on the gradients
WRITTEN = ("mismatch", "nondifferentiable", "nondeterministic")
#: the versions recorded and compared (python is platform.python_version())
PACKAGES = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "keras": ("keras",),
    "transformers": ("transformers",),
}
#: the data files a bundle may name (anything else is refused)
DATA_FILES = ("inputs.npz", "weights.npz", "fn_weights.npz", "batch.npz")


class ReproBundleError(GradcheckError):
    """A bundle is missing, corrupt, of another format, or cannot be replayed
    here; the message says which file and what is wrong or missing."""


# ------------------------------------------------------------------ session
_session_dir: Path | None = None


def set_session_dir(path: str | os.PathLike[str] | None) -> None:
    """The directory every failing check writes its bundle to when no
    ``repro_dir=`` is given (the pytest plugin's ``--gradcheck-repro-dir``);
    None turns it off."""
    global _session_dir
    _session_dir = None if path is None else Path(path)


def session_dir() -> Path | None:
    return _session_dir


def _target_dir(repro_dir: Any) -> Path | None:
    if repro_dir is None:
        return _session_dir
    if not isinstance(repro_dir, (str, os.PathLike)):
        from gradcheck.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"repro_dir must be a path (str or os.PathLike) or None; got {repro_dir!r}."
        )
    return Path(repro_dir)


def wants(report: CheckReport) -> bool:
    """Whether ``report`` is a failure a bundle is written for."""
    return report.status in WRITTEN


# ------------------------------------------------------------------ facts
def versions() -> dict[str, str | None]:
    """python, numpy, torch, tensorflow, keras, transformers, gradcheck: the
    installed versions, read from package metadata (nothing imported); None for a
    package not installed."""
    import gradcheck

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in PACKAGES.items():
        found[name] = None
        for dist in dists:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                found[name] = importlib.metadata.version(dist)
                break
    found["gradcheck"] = gradcheck.__version__
    return found


def machine() -> dict[str, str]:
    """The platform and the CPU's model name (/proc/cpuinfo where there is one:
    cheap, unlike lscpu; else platform.processor())."""
    cpu = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.partition(":")[2].strip()
                    break
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu or platform.processor() or "unknown",
    }


# ------------------------------------------------------------------ data
class _NotData(Exception):
    """A value a bundle cannot hold as data (the message says which and why)."""


class _Arrays:
    """The arrays of one .npz file being written, keyed by readable names."""

    def __init__(self) -> None:
        self.arrays: dict[str, Any] = {}

    def add(self, key: str, array: Any) -> str:
        import numpy as np

        array = np.asarray(array)
        if array.dtype.hasobject:
            raise _NotData(f"{key} is an object array")
        base, n = key, 1
        while key in self.arrays:
            n += 1
            key = f"{base}~{n}"
        self.arrays[key] = array
        return key


def _encode(value: Any, arrays: _Arrays, path: str) -> Any:
    """A JSON tree describing ``value`` whose tensors go into ``arrays``.

    Leaves: ``{"tensor": key, "framework": ..., "dtype": ..., ...}`` or
    ``{"value": json}``; containers ``{"tuple"|"list": [...]}``, ``{"dict":
    {str: ...}}``. Anything else is :class:`_NotData`."""
    import numpy as np

    torch = sys.modules.get("torch")
    tf = sys.modules.get("tensorflow")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        if t.dtype == torch.bfloat16:  # NumPy has none: float32 holds it exactly
            t = t.float()
        if t.is_complex():
            raise _NotData(f"{path} is a complex tensor")
        return {
            "tensor": arrays.add(path, t.numpy()),
            "framework": "torch",
            "dtype": dtype,
            "shape": list(t.shape),
            "requires_grad": bool(value.requires_grad),
            "device": str(value.device),
        }
    if tf is not None and isinstance(value, (tf.Tensor, tf.Variable)):
        arr = np.asarray(value.numpy())
        return {
            "tensor": arrays.add(path, arr),
            "framework": "tensorflow",
            "dtype": value.dtype.name,
            "shape": list(arr.shape),
            "variable": isinstance(value, tf.Variable),
        }
    if isinstance(value, np.ndarray):
        return {
            "tensor": arrays.add(path, value),
            "framework": "numpy",
            "dtype": str(value.dtype),
            "shape": list(value.shape),
        }
    if isinstance(value, np.generic) and not isinstance(value, np.object_):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return {"value": value}
    if isinstance(value, float):
        return {"value": value} if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (tuple, list)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [_encode(v, arrays, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {
            "dict": {k: _encode(v, arrays, f"{path}.{k}") for k, v in value.items()}
        }
    raise _NotData(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which a "
        "bundle cannot hold as data (tensors, arrays, numbers, strings, and "
        "tuples/lists/str-keyed dicts of them can)"
    )


def _decode(tree: Any, arrays: Mapping[str, Any], where: str) -> Any:
    """The values ``_encode`` described, rebuilt from ``arrays`` (a tensor back on
    its device when that exists here, else the CPU)."""
    if not isinstance(tree, Mapping) or len(tree) < 1:
        raise ReproBundleError(f"{where}: malformed value description {tree!r}")
    if "value" in tree:
        v = tree["value"]
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise ReproBundleError(f"{where}: a value is {type(v).__name__}")
        return v
    if "float" in tree:
        try:
            return float(str(tree["float"]))
        except ValueError:
            raise ReproBundleError(f"{where}: bad float {tree['float']!r}") from None
    for kind, ctor in (("tuple", tuple), ("list", list)):
        if kind in tree:
            items = tree[kind]
            if not isinstance(items, list):
                raise ReproBundleError(f"{where}: {kind} is not a list")
            return ctor(_decode(v, arrays, where) for v in items)
    if "dict" in tree:
        items = tree["dict"]
        if not isinstance(items, Mapping):
            raise ReproBundleError(f"{where}: dict is not an object")
        return {str(k): _decode(v, arrays, where) for k, v in items.items()}
    if "tensor" in tree:
        key = tree["tensor"]
        if key not in arrays:
            raise ReproBundleError(f"{where}: array {key!r} is missing")
        arr = arrays[key]
        if list(arr.shape) != list(tree.get("shape", arr.shape)):
            raise ReproBundleError(
                f"{where}: array {key!r} has shape {list(arr.shape)}, the bundle "
                f"says {tree.get('shape')}"
            )
        fw = tree.get("framework")
        if fw == "numpy":
            return arr
        if fw == "torch":
            return _torch_tensor(arr, tree, where)
        if fw == "tensorflow":
            return _tf_tensor(arr, tree, where)
        raise ReproBundleError(f"{where}: unknown framework {fw!r} for {key!r}")
    raise ReproBundleError(f"{where}: malformed value description {tree!r}")


def _torch_tensor(arr: Any, tree: Mapping[str, Any], where: str) -> Any:
    torch = _framework("torch")
    dtype = getattr(torch, str(tree.get("dtype", "")), None)
    if not isinstance(dtype, torch.dtype):
        raise ReproBundleError(f"{where}: unknown torch dtype {tree.get('dtype')!r}")
    t = torch.from_numpy(arr.copy()).to(dtype)
    device = str(tree.get("device", "cpu"))
    if device.startswith("cuda") and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a cuda:3 not here: the CPU
            t = t.to(device)
    if tree.get("requires_grad"):
        t.requires_grad_(True)
    return t


def _tf_tensor(arr: Any, tree: Mapping[str, Any], where: str) -> Any:
    tf = _framework("tensorflow")
    try:
        dtype = tf.as_dtype(str(tree.get("dtype")))
    except TypeError:
        raise ReproBundleError(
            f"{where}: unknown TensorFlow dtype {tree.get('dtype')!r}"
        ) from None
    if tree.get("variable"):
        return tf.Variable(tf.constant(arr, dtype=dtype))
    return tf.constant(arr, dtype=dtype)


def _framework(name: str) -> Any:
    try:
        if name == "tensorflow":
            from gradcheck._quiet import import_quietly

            return import_quietly("tensorflow")
        return importlib.import_module(name)
    except ImportError as exc:
        raise ReproBundleError(
            f"this bundle needs {name}, which is not installed here ({exc})."
        ) from None


# ------------------------------------------------------------------ names
def importable_name(obj: Any) -> str | None:
    """``module:qualname`` naming ``obj`` that resolves back to the very same
    object, else None (a lambda, a closure, a local class, ``__main__``). Reads
    ``sys.modules`` only: naming imports nothing."""
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    if not isinstance(mod, str) or not isinstance(qual, str) or "<" in qual:
        return None
    if mod == "__main__" or mod not in sys.modules:
        return None
    target: Any = sys.modules[mod]
    for part in qual.split("."):
        target = getattr(target, part, None)
    return f"{mod}:{qual}" if target is obj else None


def _why_not_importable(obj: Any, what: str) -> str:
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    if mod == "__main__":
        return (
            f"{what} ({qual}) is defined in __main__ (a script), which another "
            "process cannot import: move it into a module"
        )
    if isinstance(qual, str) and "<" in qual:
        return (
            f"{what} ({qual}) is a lambda, a closure or a local definition, which "
            "cannot be imported by name: define it at module level"
        )
    return f"{what} ({mod}.{qual}) cannot be imported by that name"


def _resolve(name: str, what: str) -> Any:
    """Import ``module:qualname`` from this machine (the user's code, never the
    bundle's). Standard-library and builtin names are refused."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise ReproBundleError(f"{what}: {name!r} is not 'module:qualname'.")
    mod, _, qual = name.partition(":")
    parts = [*mod.split("."), *qual.split(".")]
    if not all(p.isidentifier() for p in parts):
        raise ReproBundleError(f"{what}: {name!r} is not 'module:qualname'.")
    top = mod.split(".")[0]
    if (
        top in getattr(sys, "stdlib_module_names", ())
        or top in sys.builtin_module_names
    ):
        raise ReproBundleError(
            f"{what}: {name!r} names the standard library; a bundle may only name "
            "your own code, transformers/Keras models or gradcheck's audit jobs."
        )
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as exc:
        raise ReproBundleError(
            f"{what}: cannot import {mod!r} ({exc}); the replay needs the code the "
            "bundle names: run it where that module is importable (PYTHONPATH)."
        ) from None
    for part in qual.split("."):
        if not hasattr(obj, part):
            raise ReproBundleError(f"{what}: {mod} has no {qual!r}.")
        obj = getattr(obj, part)
    return obj


def _constructible(cls: type) -> bool:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty
        or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in sig.parameters.values()
    )


def _torch_module_ref(module: Any, near: Any, what: str) -> tuple[dict[str, Any], str]:
    """How a replay gets ``module`` back: ``{"ref": "mod:attr"}`` (a module-level
    object of ``near``'s module, whose state is then loaded) or ``{"class":
    "mod:Qual"}`` (constructed with no arguments, then loaded). Returns (the
    description, "" or the reason it cannot be had)."""
    mod_name = getattr(near, "__module__", None)
    ref = _object_ref(module, near)
    if ref is not None:
        return {"ref": ref}, ""
    cls = type(module)
    name = importable_name(cls)
    desc: dict[str, Any] = {"class": name or f"{cls.__module__}.{cls.__qualname__}"}
    if name is None:
        return desc, _why_not_importable(cls, f"{what}'s class")
    if not _constructible(cls):
        return desc, (
            f"{what}'s class {name} needs constructor arguments, which a bundle "
            "does not record: give them defaults, or make the model a module-level "
            f"object of {mod_name or 'the function'}'s module"
        )
    return desc, ""


def _state_arrays(module: Any) -> tuple[_Arrays, dict[str, Any]]:
    arrays = _Arrays()
    meta: dict[str, Any] = {}
    for key, value in module.state_dict().items():
        meta[key] = _encode(value, arrays, key)
    return arrays, meta


def _keras_arrays(model: Any) -> tuple[_Arrays, dict[str, Any]]:
    import numpy as np

    arrays = _Arrays()
    meta: dict[str, Any] = {}
    for i, w in enumerate(model.weights):
        arr = np.asarray(w.numpy())
        key = arrays.add(f"{i:04d}", arr)
        meta[key] = {
            "path": str(getattr(w, "path", getattr(w, "name", ""))),
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
        }
    return arrays, meta


def _load_torch_state(module: Any, arrays: Mapping[str, Any], meta: Any) -> None:
    if not isinstance(meta, Mapping):
        raise ReproBundleError("weights: malformed state_dict description")
    torch = _framework("torch")
    want = module.state_dict()
    missing = sorted(set(want) - set(meta))
    unexpected = sorted(set(meta) - set(want))
    if missing or unexpected:
        raise ReproBundleError(
            "the stored weights do not fit the model rebuilt here: "
            + "; ".join(
                s
                for s in (
                    f"missing {missing[:5]}" if missing else "",
                    f"unexpected {unexpected[:5]}" if unexpected else "",
                )
                if s
            )
            + " (the model's code or the library version changed its layout)."
        )
    state = {}
    for key, tree in meta.items():
        t = _decode(tree, arrays, f"weights[{key!r}]")
        if tuple(t.shape) != tuple(want[key].shape):
            raise ReproBundleError(
                f"weight {key!r}: stored shape {tuple(t.shape)}, the model rebuilt "
                f"here has {tuple(want[key].shape)}."
            )
        state[key] = t.detach()
    # the recorded dtype and device, not the freshly built module's (a model
    # checked after .double() is float64): set them, then load the values
    with torch.no_grad():
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if key in state and (
                tensor.dtype != state[key].dtype or tensor.device != state[key].device
            ):
                tensor.data = tensor.data.to(state[key].device, state[key].dtype)
        module.load_state_dict(state, strict=True)


def _load_keras_weights(model: Any, arrays: Mapping[str, Any], meta: Any) -> None:
    if not isinstance(meta, Mapping):
        raise ReproBundleError("weights: malformed Keras weights description")
    weights = list(model.weights)
    keys = sorted(meta)
    if len(keys) != len(weights):
        raise ReproBundleError(
            f"the bundle stores {len(keys)} Keras weights, the model rebuilt here "
            f"has {len(weights)}."
        )
    for key, w in zip(keys, weights, strict=True):
        if key not in arrays:
            raise ReproBundleError(f"weights: array {key!r} is missing")
        arr = arrays[key]
        if tuple(arr.shape) != tuple(w.shape):
            raise ReproBundleError(
                f"Keras weight {meta[key].get('path', key)!r}: stored shape "
                f"{tuple(arr.shape)}, the model rebuilt here has {tuple(w.shape)}."
            )
        w.assign(arr.astype(str(w.dtype)))


# ------------------------------------------------------------------ writing
def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (slug or "check")[:60].rstrip("-.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verdict(report: CheckReport) -> dict[str, Any]:
    def num(x: float) -> float | str:
        return float(x) if math.isfinite(x) else str(x)

    return {
        "status": report.status,
        "headline": report.headline(),
        "error": num(report.error),
        "tolerance": num(report.tolerance),
        "location": report.location.describe() if report.location else None,
        "framework": report.framework,
        "device": report.device,
    }


def _write(
    directory: Path,
    *,
    name: str,
    call: dict[str, Any],
    report: CheckReport,
    data: Mapping[str, _Arrays],
    reason: str = "",
) -> Path:
    """Write the bundle under ``directory``; return its path (an identical
    bundle already there is returned as it is)."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=directory))
    try:
        files: dict[str, Any] = {}
        for fname, arrays in data.items():
            if not arrays.arrays:
                continue
            np.savez(tmp / fname, **arrays.arrays)
            files[fname] = {
                "sha256": _sha256(tmp / fname),
                "arrays": {
                    k: {"shape": list(a.shape), "dtype": str(a.dtype)}
                    for k, a in arrays.arrays.items()
                },
            }
        content = json.dumps(
            {
                "call": call,
                "status": report.status,
                "files": {k: v["sha256"] for k, v in files.items()},
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(content.encode()).hexdigest()[:10]
        doc = {
            "format": FORMAT,
            "id": digest,
            "replayable": not reason,
            "not_replayable_because": reason or None,
            "call": call,
            "verdict": _verdict(report),
            "label": report.label,
            "versions": versions(),
            "machine": machine(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "files": files,
        }
        (tmp / BUNDLE_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        base = f"{_slug(name)}-{digest}"
        n = 1
        while True:
            final = directory / (base if n == 1 else f"{base}-{n}")
            (tmp / "README.txt").write_text(_readme(doc, final))
            saved, report.repro_bundle = report.repro_bundle, str(final)
            try:  # the report as the caller will see it: naming its bundle
                (tmp / "report.json").write_text(
                    json.dumps(report.to_dict(), indent=2) + "\n"
                )
            finally:
                report.repro_bundle = saved
            for p in tmp.iterdir():
                os.chmod(p, 0o644)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)  # fails on an existing (non-empty) directory
                return final
            except OSError:
                if not final.exists():
                    raise
            if _same_bundle(final, digest):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            n += 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _same_bundle(path: Path, digest: str) -> bool:
    try:
        return json.loads((path / BUNDLE_FILE).read_text()).get("id") == digest
    except (OSError, ValueError, AttributeError):
        return False


def _readme(doc: Mapping[str, Any], path: Path) -> str:
    v = doc["verdict"]
    lines = [
        "gradcheck repro bundle",
        "======================",
        "",
        f"What failed: {doc.get('label') or '(no label)'}",
        f"  {v['headline']}",
        f"  error {_num(v['error'])}, tolerance {_num(v['tolerance'])}",
        f"Call: {describe_call(doc['call'])}",
        f"Recorded {doc['created']} on {doc['machine']['cpu']} "
        f"({doc['machine']['platform']}).",
        "Versions: "
        + ", ".join(
            f"{k} {val or 'not installed'}" for k, val in doc["versions"].items()
        ),
        "",
    ]
    if doc["replayable"]:
        lines += [
            "Replay it (here or on another machine with gradcheck installed):",
            "",
            f"    gradcheck replay {path}",
            "",
            "It prints 'reproduced: <verdict>' (exit 0) or 'not reproduced: "
            "<verdict>, versions differ in ...' (exit 1).",
        ]
    else:
        lines += [
            "This bundle cannot be replayed automatically:",
            f"  {doc['not_replayable_because']}",
            "The data (inputs, weights) and the call are still here to read.",
        ]
    lines += [
        "",
        "Files:",
        "  bundle.json  the call, the verdict, versions, machine; sha256 of the data",
        "  report.json  the full report",
    ]
    for fname in doc["files"]:
        what = {
            "inputs.npz": "the inputs (NumPy arrays; dtypes etc. in bundle.json;"
            " a training step's global tensors; a Keras step's x, y, sample weights)",
            "weights.npz": "the model's weights (state_dict / Keras weights)",
            "fn_weights.npz": "the weights of the module called as fn",
            "batch.npz": "the batch (an audit example's, a cross-framework check's)",
        }.get(fname, "data")
        lines.append(f"  {fname:<12} {what}")
    lines += [
        "",
        "The .npz files hold plain arrays (numpy.load(path, allow_pickle=False)); "
        "nothing here is code. A replay imports only what bundle.json names from "
        "the machine it runs on.",
        "",
    ]
    return "\n".join(lines)


def describe_call(call: Mapping[str, Any]) -> str:
    entry = call.get("entry")

    def opts() -> str:
        return ", ".join(f"{k}={v!r}" for k, v in call.get("options", {}).items())

    if entry == "check_model":
        target = call.get("spec") or call.get("model", {}).get("class", "a model")
        return (
            f"gradcheck.check_model({target!r}, properties={call.get('property')!r}, "
            f"dtype={call.get('dtype')!r}, seed={call.get('seed')}"
            + (f", weights={call['loss_weights']}" if call.get("loss_weights") else "")
            + ")"
        )
    if entry == "check_gradients":
        fn = call.get("fn", {})
        params = call.get("params")
        p = "" if not params else ", params=<" + str(params.get("kind")) + ">"
        return f"gradcheck.check_gradients({_fn_label(fn)}, <inputs>{p}, {opts()})"
    if entry in ("check_linearity", "check_locality"):
        fn = call.get("total_fn", {})
        heads = ", ".join(
            f"{k!r}: {_fn_label(d)}" for k, d in (call.get("loss_fns") or {}).items()
        )
        exp = ", expected=<dict>" if entry == "check_locality" else ""
        return (
            f"gradcheck.{entry}({_fn_label(fn)}, {{{heads}}}, "
            f"{call.get('weights')}, <inputs>{exp}, {opts()})"
        )
    if entry == "check_training_step":
        fn = call.get("step_fn", {})
        model = (call.get("model") or {}).get("ref", "<model>")
        return (
            f"gradcheck.check_training_step({_fn_label(fn)}, "
            f"{model}, <loss_fns>, {call.get('weights')}, {opts()})"
        )
    if entry == "check_keras_model":
        model = (call.get("keras_model") or {}).get("class_name", "<model>")
        return f"gradcheck.check_keras_model(<{model}>, <x>, <y>, {opts()})"
    if entry in ("check_variants", "check_devices"):
        fn = call.get("loss_fn", {})
        model = call.get("model") or {}
        target = model.get("ref") or model.get("class") or f"<{model.get('kind')}>"
        key = "variants" if entry == "check_variants" else "devices"
        return (
            f"gradcheck.{entry}({_fn_label(fn)}, {target}, "
            f"<batch>, {key}={call.get(key)!r}, {opts()})"
        )
    if entry == "check_distributed":
        return (
            f"gradcheck.check_distributed({call.get('build')}, {call.get('step')}, "
            f"<batch>, world_size={call.get('world_size')}, "
            f"backend={call.get('backend')!r}, wrap={call.get('wrap')!r}, {opts()})"
        )
    if entry == "check_cross_framework":
        return (
            f"gradcheck.check_cross_framework(<ModelSpec>, <batch>, "
            f"dtype={call.get('dtype')!r}, {opts()})"
        )
    if entry == "audit":
        return (
            f"audit job {call.get('job')!r}, example seed {call.get('check_seed')} "
            f"(audit seed {call.get('audit_seed')})"
        )
    return repr(entry)


def _fn_label(desc: Mapping[str, Any]) -> Any:
    """A recorded function's name, else its kind (see :func:`_fn_desc`)."""
    return desc.get("name") or desc.get("kind")


def _note(report: CheckReport, path: Path | None, problem: str = "") -> None:
    if path is not None:
        report.repro_bundle = str(path)
    elif problem:
        report.notes.append(f"no repro bundle written: {problem}")


# One way to write a bundle: every write_*_bundle hands _write_failing (or
# _write_guarded) a function that describes the call (filling the data files and
# the reasons it cannot be replayed) and returns the bundle's name with it.
def _write_failing(
    repro_dir: Any, report: CheckReport, describe: _Describe, *checked: Any
) -> Path | None:
    """The bundle of a failing ``report`` (see :func:`_write_guarded`), or None:
    no directory asked for, a passing report, or (no ``repro_dir`` given) one of
    ``checked`` is gradcheck's own, checked inside another front door, which
    writes the bundle. A ``repro_dir`` that is no path raises."""
    directory = _target_dir(repro_dir)
    if directory is None or not wants(report):
        return None
    if repro_dir is None and any(_gradchecks_own(f) for f in checked):
        return None
    return _write_guarded(directory, report, describe)


def _save(
    directory: Path,
    report: CheckReport,
    name: str,
    call: dict[str, Any],
    data: Mapping[str, _Arrays],
    reasons: list[str],
) -> Path:
    """Write the bundle (not replayable for ``reasons``, each said once) and
    name it on ``report``."""
    path = _write(
        directory,
        name=name,
        call=call,
        report=report,
        data=data,
        reason="; ".join(dict.fromkeys(reasons)),
    )
    _note(report, path)
    return path


#: a bundle's data files by name
_Data = dict[str, _Arrays]
#: a bundle's name and its call
_Described = tuple[str, dict[str, Any]]
#: describes a bundle's call: fills the data files and the reasons a replay
#: cannot rerun it, returns ``(name, call)``
_Describe = Callable[[_Data, list[str]], _Described]


def _write_guarded(
    directory: Path, report: CheckReport, describe: _Describe
) -> Path | None:
    """The bundle ``describe`` describes, written (see :func:`_save`). A bundle
    that cannot be written (disk full, no permission) is a note on the report,
    never an exception that hides the verdict."""
    try:
        data: dict[str, _Arrays] = {}
        reasons: list[str] = []
        name, call = describe(data, reasons)
        return _save(directory, report, name, call, data, reasons)
    except Exception as exc:  # noqa: BLE001 - never hide the verdict
        _note(report, None, f"{type(exc).__name__}: {exc}")
        return None


def _encoded(
    value: Any, data: dict[str, _Arrays], fname: str, path: str, reasons: list[str]
) -> Any:
    """``value`` as JSON, its arrays in ``data[fname]``; None, and the reason,
    for a value that is not data."""
    arrays = _Arrays()
    try:
        desc = _encode(value, arrays, path)
    except _NotData as exc:
        desc = None
        reasons.append(str(exc))
    data[fname] = arrays
    return desc


# One way to record a model's weights: a torch module's state_dict or a Keras
# model's weights, stored in a data file; the metadata a replay loads them by.
def _store_weights(
    model: Any, data: dict[str, _Arrays], fname: str = "weights.npz", *, keras: bool
) -> Any:
    arrays, meta = (_keras_arrays if keras else _state_arrays)(model)
    data[fname] = arrays
    return meta


def _torch_desc(
    module: Any,
    near: Any,
    what: str,
    data: dict[str, _Arrays],
    reasons: list[str],
    fname: str = "weights.npz",
) -> dict[str, Any]:
    """A torch module as data: by reference or class (see
    :func:`_torch_module_ref`), its state_dict in ``data[fname]``."""
    ref, why = _torch_module_ref(module, near, what)
    meta = _store_weights(module, data, fname, keras=False)
    if why:
        reasons.append(why)
    return {"kind": "torch_module", **ref, "state": meta}


# -------------------------------------------------- check_gradients bundles
def write_gradients_bundle(
    repro_dir: Any,
    report: CheckReport,
    fn: Any,
    inputs: Any,
    params: Any,
    options: Mapping[str, Any],
) -> Path | None:
    """A bundle for a failing :func:`gradcheck.check_gradients` (nothing for a
    passing one). Sets ``report.repro_bundle``; a bundle that cannot be written
    (disk full, no permission) is a note on the report, never an exception that
    hides the verdict."""

    def describe(data: _Data, reasons: list[str]) -> _Described:
        params_desc = _params_desc(params, fn, data, reasons)
        fn_desc = _fn_desc(fn, params, params_desc, data, reasons, "fn")
        call = {
            "entry": "check_gradients",
            "fn": fn_desc,
            "params": params_desc,
            "inputs": _inputs_desc(inputs, data, reasons),
            "options": dict(options),
        }
        name = report.label or fn_desc.get("name") or "check_gradients"
        return f"{name}-{report.dtype}", call

    return _write_failing(repro_dir, report, describe, fn)


def _params_desc(
    params: Any, fn: Any, data: dict[str, _Arrays], reasons: list[str]
) -> dict[str, Any] | None:
    """How a replay gets ``params`` back (``None`` for none): a torch module by
    reference or class, with its state_dict in weights.npz; anything else is
    written down as not replayable, with the reason."""
    if params is None:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(params, torch.nn.Module):
        return _torch_desc(params, fn, "params", data, reasons)
    reasons.append(
        f"params= is a {type(params).__name__}: a replay can rebuild a "
        "torch nn.Module (importable, or its class constructible with no "
        "arguments), not tensors or a Keras model that fn reads from "
        "elsewhere; pass the model as params=, or check it with "
        "gradcheck.check_model"
    )
    return {"kind": type(params).__name__}


def _fn_desc(
    fn: Any,
    params: Any,
    params_desc: Mapping[str, Any] | None,
    data: dict[str, _Arrays],
    reasons: list[str],
    what: str,
    module_file: str | None = "fn_weights.npz",
) -> dict[str, Any]:
    """How a replay gets the callable ``fn`` back: ``params`` itself or one of
    its methods, a torch module (its state in ``module_file``), or an importable
    ``module:qualname``. A lambda, a closure, a ``__main__`` function: recorded
    with the reason it cannot be replayed."""
    torch = sys.modules.get("torch")
    if params is not None and fn is params:
        return {"kind": "params"}
    if (
        params is not None
        and getattr(fn, "__self__", None) is params
        and isinstance(getattr(fn, "__name__", None), str)
    ):
        return {"kind": "params_method", "name": fn.__name__}
    if torch is not None and isinstance(fn, torch.nn.Module) and module_file:
        return _torch_desc(fn, fn, what, data, reasons, module_file)
    name = importable_name(fn)
    if name is None:
        reasons.append(_why_not_importable(fn, what))
        return {"kind": "unknown", "repr": repr(fn)[:200]}
    if params_desc is not None and "class" in params_desc:
        reasons.append(
            f"{what} {name} reads params from somewhere the bundle cannot name "
            "(the model is no module-level object of its module): make it "
            "one, or pass the model itself as fn"
        )
    return {"kind": "importable", "name": name}


def _inputs_desc(
    inputs: Any, data: dict[str, _Arrays], reasons: list[str]
) -> dict[str, Any] | None:
    return _encoded(tuple(inputs), data, "inputs.npz", "inputs", reasons)


# -------------------------------------------------- linearity / locality bundles
def write_heads_bundle(
    repro_dir: Any,
    report: CheckReport,
    entry: str,
    total_fn: Any,
    loss_fns: Mapping[str, Any],
    weights: Mapping[str, float],
    inputs: Any,
    params: Any,
    options: Mapping[str, Any],
    *,
    expected: Any = None,
) -> Path | None:
    """A bundle for a failing :func:`gradcheck.check_linearity` (``entry``
    "check_linearity") or :func:`gradcheck.check_locality` ("check_locality"):
    ``total_fn`` and every loss function by name (or as ``params``' methods),
    the weights, ``expected`` as JSON, the inputs and ``params``' state_dict.
    Nothing for a passing check; a bundle that cannot be written is a note."""

    def describe(data: _Data, reasons: list[str]) -> _Described:
        params_desc = _params_desc(params, total_fn, data, reasons)
        call: dict[str, Any] = {
            "entry": entry,
            "total_fn": _fn_desc(
                total_fn, params, params_desc, data, reasons, "total_fn"
            ),
            "loss_fns": {
                str(k): _fn_desc(
                    f, params, params_desc, data, reasons, f"loss_fns[{k!r}]", None
                )
                for k, f in loss_fns.items()
            },
            "weights": {str(k): float(w) for k, w in weights.items()},
            "params": params_desc,
            "inputs": _inputs_desc(inputs, data, reasons),
            "options": dict(options),
        }
        if entry == "check_locality":
            call["expected"] = _expected_desc(expected, reasons)
        name = report.label or call["total_fn"].get("name") or entry
        return f"{name}-{report.property}-{report.dtype}", call

    # check_model's heads are gradcheck's own: check_model writes the bundle
    return _write_failing(repro_dir, report, describe, total_fn)


def _gradchecks_own(fn: Any) -> bool:
    """A function of gradcheck's own (check_model's loss heads, an audit's
    built model): checked inside another front door, which writes the
    replayable bundle; the session's directory is for the user's checks."""
    return str(getattr(fn, "__module__", "")).startswith("gradcheck.")


def _expected_desc(expected: Any, reasons: list[str]) -> Any:
    if not isinstance(expected, Mapping):
        reasons.append(f"expected is a {type(expected).__name__}, not a dict")
        return None
    out: dict[str, Any] = {}
    for k, v in expected.items():
        if not isinstance(k, str):
            reasons.append(f"expected has a key {k!r} that is not a str")
            return None
        if isinstance(v, str):
            out[k] = v
        else:
            try:
                out[k] = [str(x) for x in v]
            except TypeError:
                reasons.append(f"expected[{k!r}] is not a list of loss names")
                return None
    return out


# -------------------------------------------------- training-step bundles
def write_training_bundle(
    repro_dir: Any,
    report: CheckReport,
    step_fn: Any,
    model: Any,
    loss_fns: Mapping[str, Any],
    weights: Mapping[str, float],
    *,
    scaler: Any = None,
    autocast: Any = None,
    options: Mapping[str, Any],
) -> Path | None:
    """A bundle for a failing :func:`gradcheck.check_training_step`.

    ``step_fn`` takes no arguments: it reaches the model, batch and optimizer
    through its module's globals. So a replay needs ``step_fn`` and the loss
    functions importable by ``module:qualname`` and the model a module-level
    object there (its state_dict is stored and loaded); the torch tensors the
    step and the loss functions read from their module's globals (the batch)
    are stored in inputs.npz and put back for the replay (then restored), so a
    batch drawn at import without a seed replays as recorded. The scaler (a
    module-level GradScaler) is named with its state (scale, growth tracker);
    an optimizer is rebuilt by the import (gradcheck undoes its step anyway)."""

    def describe(data: _Data, reasons: list[str]) -> _Described:
        model_desc = _params_desc(model, step_fn, data, reasons)
        if model_desc is not None and "class" in model_desc:
            reasons.append(
                "the model is no module-level object of step_fn's module, which "
                "step_fn reads it from: a replay could only build another one"
            )
        fns = {
            "step_fn": step_fn,
            **{f"loss_fns[{k!r}]": f for k, f in loss_fns.items()},
        }
        descs = {
            what: _fn_desc(f, model, None, data, reasons, what, None)
            for what, f in fns.items()
        }
        arrays = _Arrays()
        globals_desc = _global_tensors(fns.values(), arrays, model, reasons)
        data["inputs.npz"] = arrays
        call: dict[str, Any] = {
            "entry": "check_training_step",
            "step_fn": descs["step_fn"],
            "model": model_desc,
            "loss_fns": {str(k): descs[f"loss_fns[{k!r}]"] for k in loss_fns},
            "weights": {str(k): float(w) for k, w in weights.items()},
            "globals": globals_desc,
            "scaler": _scaler_desc(scaler, step_fn, reasons),
            "autocast": None
            if autocast is None
            else str(autocast).removeprefix("torch."),
            "options": dict(options),
        }
        name = report.label or descs["step_fn"].get("name") or "check_training_step"
        return f"{name}-{report.dtype}", call

    return _write_failing(repro_dir, report, describe, step_fn)


def _global_tensors(
    fns: Any, arrays: _Arrays, model: Any, reasons: list[str]
) -> dict[str, Any]:
    """``{"module:name": value description}`` of the torch tensors the functions
    read from their module's globals (names in their code, nested functions
    included), the model's own parameters excepted."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    own = {id(p) for p in model.parameters()} if model is not None else set()
    found: dict[str, Any] = {}
    todo, seen = [getattr(f, "__func__", f) for f in fns], set()
    while todo:
        fn = todo.pop()
        glb = getattr(fn, "__globals__", None)
        code = getattr(fn, "__code__", None)
        mod = getattr(fn, "__module__", None)
        if id(fn) in seen or glb is None or code is None or not isinstance(mod, str):
            continue
        seen.add(id(fn))
        names: set[str] = set()
        stack = [code]
        while stack:
            c = stack.pop()
            names.update(c.co_names)
            stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
        for n in sorted(names):
            v = glb.get(n)
            if isinstance(v, torch.Tensor) and id(v) not in own:
                key = f"{mod}:{n}"
                if key in found:
                    continue
                size = v.numel() * v.element_size()
                if size > GLOBAL_TENSOR_BYTES:  # a whole data set: not copied
                    found[key] = {
                        "skipped": f"{size:,} bytes, over the "
                        f"{GLOBAL_TENSOR_BYTES:,}-byte limit: not stored"
                    }
                    continue
                found[key] = _encode(v, arrays, f"globals.{mod}.{n}")
            elif inspect.isfunction(v) and v.__module__ == mod:
                todo.append(v)  # a helper of the same module the step calls
    return found


#: a global tensor a training step reads is stored up to this size; a larger
#: one (a whole data set in memory) is named as skipped, and a replay uses what
#: importing its module makes
GLOBAL_TENSOR_BYTES = 64 * 2**20


def _scaler_desc(scaler: Any, near: Any, reasons: list[str]) -> dict[str, Any] | None:
    if scaler is None:
        return None
    ref = _object_ref(scaler, near)
    state = {}
    with contextlib.suppress(Exception):
        state = {
            k: v
            for k, v in scaler.state_dict().items()
            if isinstance(v, (int, float, bool, str))
        }
    if ref is None:
        reasons.append(
            "the scaler is no module-level object of step_fn's module, which "
            "step_fn reads it from"
        )
    return {"ref": ref, "state": state}


def _object_ref(obj: Any, near: Any) -> str | None:
    """``module:attr`` of a module-level object of ``near``'s module that is
    ``obj``, else None."""
    mod_name = getattr(near, "__module__", None)
    mod = sys.modules.get(mod_name) if isinstance(mod_name, str) else None
    if mod is None or mod_name == "__main__":
        return None
    for attr, value in vars(mod).items():
        if value is obj and not attr.startswith("__"):
            return f"{mod_name}:{attr}"
    return None


# -------------------------------------------------- Keras train-step bundles
def write_keras_bundle(
    repro_dir: Any,
    report: CheckReport,
    model: Any,
    x: Any,
    y: Any,
    *,
    sample_weight: Any = None,
    class_weight: Any = None,
    options: Mapping[str, Any],
) -> Path | None:
    """A bundle for a failing :func:`gradcheck.check_keras_model`: the model as
    Keras' own JSON config (``model.to_json()``) and compile config, its
    weights, the batch (x, y, sample weights; class weights as JSON). Classes
    and loss functions that are not Keras' own (a ``keras.Model`` subclass with
    its ``train_step``, a custom layer) are recorded by ``module:qualname`` and
    handed to Keras as ``custom_objects`` on replay; Keras deserializes in safe
    mode (no lambda bytecode)."""

    def describe(data: _Data, reasons: list[str]) -> _Described:
        arch = json.loads(model.to_json())
        compile_config = model.get_compile_config()
        try:
            json.dumps(compile_config)
        except (TypeError, ValueError) as exc:
            compile_config = None
            reasons.append(f"the compile config is not JSON ({exc})")
        custom = _keras_custom_objects(model, reasons)
        meta = _store_weights(model, data, keras=True)
        batch_desc = _encoded(
            {"x": x, "y": y, "sample_weight": sample_weight},
            data,
            "inputs.npz",
            "batch",
            reasons,
        )
        if getattr(model, "_distribute_strategy", None) is not None:
            reasons.append(
                "the model was built under a tf.distribute strategy, which a replay "
                "does not recreate"
            )
        call: dict[str, Any] = {
            "entry": "check_keras_model",
            "keras_model": arch,
            "compile": compile_config,
            "custom_objects": custom,
            "weights": meta,
            "batch": batch_desc,
            "class_weight": None
            if class_weight is None
            else [[int(k), float(v)] for k, v in dict(class_weight).items()],
            "options": dict(options),
        }
        return f"{report.label or type(model).__name__}-keras-{report.dtype}", call

    return _write_failing(repro_dir, report, describe)


def _keras_custom_objects(model: Any, reasons: list[str]) -> dict[str, str]:
    """``{name Keras serializes it by: "module:qualname"}`` for the model's own
    class, its layers' and its loss functions when they are not Keras'."""
    found: list[Any] = [type(model)]
    with contextlib.suppress(Exception):
        found += [type(layer) for layer in model._flatten_layers(include_self=False)]
    losses = getattr(model, "loss", None)
    items = (
        losses.values()
        if isinstance(losses, Mapping)
        else (losses if isinstance(losses, (list, tuple)) else [losses])
    )
    found += [f for f in items if callable(f) and not isinstance(f, str)]
    out: dict[str, str] = {}
    for obj in found:
        cls = obj if isinstance(obj, type) or inspect.isfunction(obj) else type(obj)
        mod = str(getattr(cls, "__module__", ""))
        if mod.split(".")[0] in ("keras", "tensorflow", "tf_keras"):
            continue
        name = importable_name(cls)
        if name is None:
            reasons.append(_why_not_importable(cls, f"Keras object {cls.__name__}"))
            continue
        out[cls.__name__] = name
    return out


def _replay_keras(bundle: Bundle) -> CheckReport:
    from gradcheck.keras_api import check_keras_model

    call = bundle.call
    model = _rebuild_keras_model(
        call,
        bundle,
        compile_config=call.get("compile"),
        custom_what="custom class or loss",
    )
    batch = _decode(call["batch"], bundle.data("inputs.npz"), "batch")
    class_weight = call.get("class_weight")
    if class_weight is not None:
        class_weight = {int(k): float(v) for k, v in class_weight}
    return check_keras_model(
        model,
        batch["x"],
        batch["y"],
        sample_weight=batch["sample_weight"],
        class_weight=class_weight,
        label=bundle.doc.get("label"),
        **_options(call, {"seed", "rtol"}),
    )


# -------------------------------------------------- check_model bundles
def write_model_bundles(
    repro_dir: Any,
    reports: list[CheckReport],
    target: Any,
    inputs: Any,
    seed: int,
    max_parameters: int,
    checker: Any = None,
    weights: Mapping[str, float] | None = None,
) -> list[Path]:
    """Bundles for the failing reports of one :func:`gradcheck.check_model` call.
    ``checker``: the :class:`~gradcheck.models.Checker` that ran them, if they
    ran in this process (its model is reused); else one is built here for the
    weights (a check run in a worker process under ``timeout=``)."""
    directory = _target_dir(repro_dir)
    failing = [r for r in reports if wants(r)]
    if directory is None or not failing:
        return []
    from gradcheck import models

    if checker is None:
        checker = models.Checker(
            target, inputs, seed=seed, max_parameters=max_parameters, weights=weights
        )
    written = []
    for report in failing:
        meta = models._meta(report)
        prop = meta.get("property")
        if prop is None:
            continue
        try:
            path = write_model_bundle(directory, report, checker, prop, report.dtype)
        except GradcheckError as exc:  # the model cannot be rebuilt here now
            _note(report, None, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - never hide the verdict
            _note(report, None, f"{type(exc).__name__}: {exc}")
            continue
        written.append(path)
    return written


def write_model_bundle(
    directory: Any, report: CheckReport, checker: Any, prop: str, dtype: str
) -> Path:
    """The bundle of one check_model report, whatever its status (the caller
    decides which are written; :func:`write_model_bundles` writes failing ones).
    Sets ``report.repro_bundle``."""
    directory = Path(directory)
    checker.build()
    model, inputs = checker._built
    spec = checker.spec
    reasons: list[str] = []
    call: dict[str, Any] = {
        "entry": "check_model",
        "spec": spec.text if spec is not None else None,
        "property": prop,
        "dtype": dtype,
        "seed": checker.seed,
        # the loss weights themselves, not only the seed they were drawn from:
        # another Hypothesis version may draw others from the same seed
        "loss_weights": dict(checker.weights),
        "max_parameters": checker.max_parameters,
        "framework": checker.framework,
    }
    data: dict[str, _Arrays] = {}
    keras = checker.framework == "tensorflow"
    if keras and spec is not None and spec.kind == "keras" and dtype != "float32":
        model, _ = checker._keras_in(dtype)
    call["weights"] = _store_weights(model, data, keras=keras)
    if spec is None:
        ref, why = _torch_module_ref(model, model, "the model")
        call["model"] = ref
        if checker.framework != "torch":
            why = "a Keras model object cannot be rebuilt by a replay: pass a spec"
        if why:
            reasons.append(why)
    if spec is None or spec.kind != "keras":
        call["inputs"] = _encoded(inputs, data, "inputs.npz", "inputs", reasons)
    name = report.label or f"{checker.name} {prop} {dtype}"
    return _save(directory, report, name, call, data, reasons)


# -------------------------------------------------- audit bundles
def write_audit_bundle(
    repro_dir: Any, outcome: Any, job_seed: int, audit_seed: int
) -> Path | None:
    """A bundle for one audit job's example: the shrunk counterexample of a job
    that failed, or the last example of a planted job (its caught ``mismatch``).
    Nothing when the job has no failing report and no counterexample."""
    directory = _target_dir(repro_dir)
    example = getattr(outcome, "example", None)
    report = outcome.report
    if directory is None or example is None or report is None:
        return None
    if outcome.spec is None and not wants(report):
        return None
    job = outcome.job
    # encoded before the guard, as ever: an audit's batch is NumPy arrays, and
    # a failure to encode one is gradcheck's bug, never a note
    encoded: dict[str, _Arrays] = {}
    why: list[str] = []
    batch = _encoded(example["batch"], encoded, "batch.npz", "batch", why)
    call = {
        "entry": "audit",
        "job": job.name,
        "framework": job.framework,
        "property": job.property,
        "dtype": job.dtype,
        "planted": job.planted,
        "device": job.device,
        "audit_seed": audit_seed,
        "check_seed": job_seed,
        "spec": example["spec"],
        "batch": batch,
    }

    def describe(data: _Data, reasons: list[str]) -> _Described:
        data.update(encoded)
        reasons.extend(why)
        return job.name, call

    return _write_guarded(directory, report, describe)


# ------------------------------------------------------------------ loading
@dataclass
class Bundle:
    path: Path
    doc: dict[str, Any]
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def call(self) -> dict[str, Any]:
        return self.doc["call"]

    def data(self, fname: str) -> dict[str, Any]:
        if fname not in self.arrays:
            raise ReproBundleError(f"{self.path}: {fname} is missing from the bundle.")
        return self.arrays[fname]


def load(path: str | os.PathLike[str]) -> Bundle:
    """Read and verify a bundle: JSON and ``.npz`` arrays only (``allow_pickle``
    off), every data file against its recorded sha256. ReproBundleError says what
    is missing or wrong."""
    import numpy as np

    root = Path(path)
    if root.is_file() and root.name == BUNDLE_FILE:
        root = root.parent
    if not root.exists():
        raise ReproBundleError(f"no bundle at {root}: it does not exist.")
    if not root.is_dir():
        raise ReproBundleError(
            f"{root} is not a bundle: a bundle is a directory holding {BUNDLE_FILE}."
        )
    meta = root / BUNDLE_FILE
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReproBundleError(
            f"{root} is not a bundle: it has no {BUNDLE_FILE}."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReproBundleError(f"{meta}: cannot read it ({exc}).") from None
    except ValueError as exc:
        raise ReproBundleError(f"{meta} is not valid JSON ({exc}): corrupt?") from None
    if not isinstance(doc, dict):
        raise ReproBundleError(f"{meta}: expected a JSON object.")
    if doc.get("format") != FORMAT:
        raise ReproBundleError(
            f"{meta}: format {doc.get('format')!r}, this gradcheck reads {FORMAT!r}."
        )
    for key, kind in (
        ("call", dict),
        ("verdict", dict),
        ("files", dict),
        ("versions", dict),
    ):
        if not isinstance(doc.get(key), kind):
            raise ReproBundleError(f"{meta}: '{key}' is missing or malformed.")
    if doc["verdict"].get("status") not in (
        "passed",
        "mismatch",
        "nondifferentiable",
        "nondeterministic",
        "unbuildable",
        "timeout",
        "error",
    ):
        raise ReproBundleError(f"{meta}: unknown recorded status.")
    bundle = Bundle(root, doc)
    for fname, info in doc["files"].items():
        if fname not in DATA_FILES or not isinstance(info, Mapping):
            raise ReproBundleError(f"{meta}: unexpected data file {fname!r}.")
        fpath = root / fname
        if not fpath.is_file():
            raise ReproBundleError(
                f"{root}: {fname} is missing (bundle.json names it)."
            )
        if _sha256(fpath) != info.get("sha256"):
            raise ReproBundleError(
                f"{fpath}: its sha256 differs from the one in bundle.json: the file "
                "was changed or is corrupt."
            )
        try:
            with np.load(fpath, allow_pickle=False) as npz:
                bundle.arrays[fname] = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
            raise ReproBundleError(
                f"{fpath}: not a NumPy .npz of plain arrays ({exc})."
            ) from None
    return bundle


# ------------------------------------------------------------------ replay
@dataclass
class ReplayResult:
    """The rerun of a bundle: its report, the recorded status, and the versions
    that differ between the bundle and here ``(package, bundle's, here)``."""

    bundle: Bundle
    report: CheckReport
    recorded: str
    version_diffs: list[tuple[str, str, str]]
    #: variants/devices whose tensors failed when recorded and that could not
    #: run here (a GPU this machine lacks), with the reason; else None
    skipped: str | None = None

    @property
    def reproduced(self) -> bool:
        return self.report.status == self.recorded

    def versions_line(self) -> str:
        return "versions differ in " + "; ".join(
            f"{pkg}: bundle {b}, here {h}" for pkg, b, h in self.version_diffs
        )

    def verdict_line(self) -> str:
        if self.reproduced:
            return f"reproduced: {self.report.status}"
        if self.skipped is not None:
            # what failed could not run here: say so, never "passed" on the
            # variants that could
            tail = f", {self.versions_line()}" if self.version_diffs else ""
            rest = (
                "nothing else to compare ran here"
                if self.report.status == "skipped"
                else f"what did run here: {self.report.status}"
            )
            return (
                f"not reproduced: skipped ({self.skipped}){tail} (the bundle "
                f"recorded {self.recorded}; {rest})"
            )
        why = (
            self.versions_line()
            if self.version_diffs
            else "same versions as the bundle's"
        )
        return (
            f"not reproduced: {self.report.status}, {why} (the bundle recorded "
            f"{self.recorded})"
        )

    def lines(self) -> list[str]:
        doc = self.bundle.doc
        v = doc["verdict"]
        out = [
            f"bundle: {self.bundle.path}",
            f"call: {describe_call(doc['call'])}",
            f"recorded: {v.get('headline')} (error {_num(v.get('error'))}, "
            f"tolerance {_num(v.get('tolerance'))}) on {doc.get('created', '?')}, "
            f"{doc.get('machine', {}).get('cpu', '?')}",
            f"replayed: {self.report.headline()} (error {_num(self.report.error)}, "
            f"tolerance {_num(self.report.tolerance)})",
        ]
        if self.version_diffs:
            out.append(self.versions_line())
        if self.skipped is not None and self.reproduced:
            out.append(f"not judged here: {self.skipped}")
        out.append(self.verdict_line())
        return out


def _num(x: Any) -> str:
    try:
        return f"{float(x):.6e}"
    except (TypeError, ValueError):
        return str(x)


def version_diffs(recorded: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    here = versions()
    diffs = []
    for pkg in sorted(set(recorded) | set(here)):
        b, h = recorded.get(pkg), here.get(pkg)
        if pkg not in recorded:
            continue
        if (b or None) != (h or None):
            diffs.append((pkg, str(b or "not installed"), str(h or "not installed")))
    return diffs


def replay(path: str | os.PathLike[str]) -> ReplayResult:
    """Rerun the bundle at ``path``. ReproBundleError: a missing or corrupt
    bundle, one marked not replayable (with what is missing), or code it names
    that is not importable here."""
    bundle = load(path)
    doc = bundle.doc
    if not doc.get("replayable", False):
        raise ReproBundleError(
            f"{bundle.path} cannot be replayed: "
            f"{doc.get('not_replayable_because') or 'the bundle says so'}."
        )
    call = bundle.call
    entry = call.get("entry")
    # the rerun writes no bundle of its own (a replay inside a pytest session
    # with --gradcheck-repro-dir would otherwise copy the bundle it replays)
    saved_dir = session_dir()
    set_session_dir(None)
    try:
        rerun = _REPLAYS.get(entry) if isinstance(entry, str) else None
        if rerun is None:
            raise ReproBundleError(f"{bundle.path}: unknown entry point {entry!r}.")
        report = rerun(bundle)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ReproBundleError(
            f"{bundle.path}/{BUNDLE_FILE}: malformed call "
            f"({type(exc).__name__}: {exc})."
        ) from None
    finally:
        set_session_dir(saved_dir)
    return ReplayResult(
        bundle,
        report,
        doc["verdict"]["status"],
        version_diffs(doc["versions"]),
        _skipped_failures(bundle, report),
    )


def _module(desc: Mapping[str, Any], arrays: Mapping[str, Any], what: str) -> Any:
    if "ref" in desc:
        module = _resolve(desc["ref"], what)
    elif "class" in desc:
        cls = _resolve(desc["class"], what)
        if not isinstance(cls, type):
            raise ReproBundleError(f"{what}: {desc['class']} is not a class.")
        module = cls()
    else:
        raise ReproBundleError(f"{what}: the bundle says neither ref nor class.")
    torch = _framework("torch")
    if not isinstance(module, torch.nn.Module):
        raise ReproBundleError(f"{what}: {desc} is not a torch nn.Module here.")
    _load_torch_state(module, arrays, desc.get("state"))
    return module


def _replay_gradients(bundle: Bundle) -> CheckReport:
    import gradcheck

    call = bundle.call
    params = _rebuild_params(call, bundle)
    fn = _rebuild_fn(call["fn"], params, bundle, "fn")
    arrays = bundle.arrays.get("inputs.npz", {})
    inputs = _decode(call["inputs"], arrays, "inputs")
    options = _options(call, {"seed", "mode", "rtol", "step", "order", "ad"})
    return gradcheck.check_gradients(
        fn, inputs, params=params, label=bundle.doc.get("label"), **options
    )


def _rebuild_params(call: Mapping[str, Any], bundle: Bundle) -> Any:
    """The ``params=`` module a bundle records (see :func:`_params_desc`), or None."""
    desc = call.get("params")
    if desc is None:
        return None
    return _module(desc, bundle.data("weights.npz"), "params")


def _rebuild_loss_fns(
    call: Mapping[str, Any], params: Any, bundle: Bundle
) -> dict[str, Any]:
    """``loss_fns`` (head: function) as the bundle records them."""
    if not isinstance(call["loss_fns"], Mapping):
        raise ReproBundleError("loss_fns: not an object of head: function")
    return {
        str(k): _rebuild_fn(d, params, bundle, f"loss_fns[{k!r}]")
        for k, d in call["loss_fns"].items()
    }


def _rebuild_fn(desc: Mapping[str, Any], params: Any, bundle: Bundle, what: str) -> Any:
    """The callable a bundle describes (see :func:`_fn_desc`), from this machine."""
    kind = desc.get("kind")
    if kind in ("params", "params_method") and params is None:
        raise ReproBundleError(f"{what}: a method of params, and the bundle has none.")
    if kind == "params":
        return params
    if kind == "params_method":
        return getattr(params, str(desc["name"]))
    if kind == "torch_module":
        return _module(desc, bundle.data("fn_weights.npz"), what)
    if kind == "importable":
        return _resolve(desc["name"], what)
    raise ReproBundleError(f"{what}: cannot rebuild a function of kind {kind!r}.")


def _options(call: Mapping[str, Any], allowed: set[str]) -> dict[str, Any]:
    options = dict(call.get("options") or {})
    unknown = set(options) - allowed
    if unknown:
        raise ReproBundleError(f"options: unknown {sorted(unknown)}.")
    return options


def _weights(call: Mapping[str, Any]) -> dict[str, float]:
    weights = call["weights"]
    if not isinstance(weights, Mapping):
        raise ReproBundleError("weights: not an object of head: number")
    try:
        return {str(k): float(v) for k, v in weights.items()}
    except (TypeError, ValueError):
        raise ReproBundleError("weights: not an object of head: number") from None


def _replay_heads(bundle: Bundle) -> CheckReport:
    """check_linearity / check_locality from their bundle."""
    import gradcheck

    call = bundle.call
    params = _rebuild_params(call, bundle)
    total_fn = _rebuild_fn(call["total_fn"], params, bundle, "total_fn")
    loss_fns = _rebuild_loss_fns(call, params, bundle)
    inputs = _decode(call["inputs"], bundle.arrays.get("inputs.npz", {}), "inputs")
    options = _options(call, {"seed", "rtol"})
    weights = _weights(call)
    locality = call["entry"] == "check_locality"
    check = gradcheck.check_locality if locality else gradcheck.check_linearity
    expected = {"expected": call["expected"]} if locality else {}
    return check(
        total_fn,
        loss_fns,
        weights,
        inputs,
        params=params,
        label=bundle.doc.get("label"),
        **expected,
        **options,
    )


def _replay_training(bundle: Bundle) -> CheckReport:
    """check_training_step from its bundle: the step and the loss functions
    imported, the model's stored state loaded into the module-level model they
    read, the recorded global tensors (the batch) put in their modules, the
    scaler's state set; everything of the module's is put back afterwards."""
    from gradcheck.training_api import check_training_step

    call = bundle.call
    torch = _framework("torch")
    mdesc = call.get("model")
    if not isinstance(mdesc, Mapping) or "ref" not in mdesc:
        raise ReproBundleError("model: the bundle names no module-level model.")
    model = _resolve(mdesc["ref"], "model")
    if not isinstance(model, torch.nn.Module):
        raise ReproBundleError(f"model: {mdesc['ref']} is not a torch nn.Module here.")
    step_fn = _rebuild_fn(call["step_fn"], model, bundle, "step_fn")
    loss_fns = _rebuild_loss_fns(call, model, bundle)
    scaler = None
    sdesc = call.get("scaler")
    if sdesc is not None:
        scaler = _resolve(sdesc["ref"], "scaler")
    autocast = None
    if call.get("autocast") is not None:
        autocast = getattr(torch, str(call["autocast"]), None)
        if not isinstance(autocast, torch.dtype):
            raise ReproBundleError(f"autocast: unknown dtype {call['autocast']!r}.")
    options = _options(call, {"seed", "rtol"})
    arrays = bundle.arrays.get("inputs.npz", {})
    with contextlib.ExitStack() as undo:
        undo.enter_context(_loaded_state(model, bundle, mdesc.get("state")))
        if scaler is not None and sdesc.get("state"):
            saved = scaler.state_dict()
            scaler.load_state_dict({**saved, **sdesc["state"]})
            undo.callback(scaler.load_state_dict, saved)
        globals_desc = call.get("globals") or {}
        if not isinstance(globals_desc, Mapping):
            raise ReproBundleError("globals: not an object of module:name: value")
        for name, tree in globals_desc.items():
            if isinstance(tree, Mapping) and "skipped" in tree:
                continue  # too large to store: what the import made
            mod, _, attr = str(name).partition(":")
            _resolve(f"{mod}:{attr}", f"globals[{name!r}]")  # no standard library
            module = sys.modules[mod]
            value = _decode(tree, arrays, f"globals[{name!r}]")
            undo.callback(setattr, module, attr, getattr(module, attr))
            setattr(module, attr, value)
        return check_training_step(
            step_fn,
            model,
            loss_fns,
            _weights(call),
            scaler=scaler,
            autocast=autocast,
            label=bundle.doc.get("label"),
            **options,
        )


@contextlib.contextmanager
def _loaded_state(module: Any, bundle: Bundle, meta: Any) -> Iterator[Any]:
    """The stored state_dict loaded into ``module`` (an object of the user's
    module, imported here) for the replay, its own state put back afterwards:
    a replay run in the user's process leaves their model as it was."""
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    dtypes = {
        k: (t, t.dtype, t.device)
        for k, t in [*module.named_parameters(), *module.named_buffers()]
    }
    _load_torch_state(module, bundle.data("weights.npz"), meta)
    try:
        yield module
    finally:
        with _framework("torch").no_grad():
            for tensor, dtype, device in dtypes.values():
                if tensor.dtype != dtype or tensor.device != device:
                    tensor.data = tensor.data.to(device, dtype)
            module.load_state_dict(saved, strict=True)


def _replay_model(bundle: Bundle) -> CheckReport:
    from gradcheck import models

    call = bundle.call
    spec = call.get("spec")
    inputs = None
    if "inputs" in call and call["inputs"] is not None:
        inputs = _decode(call["inputs"], bundle.data("inputs.npz"), "inputs")
    if spec is not None:
        target: Any = models.parse_spec(str(spec))
        if target.kind == "callable":
            _resolve(target.name, "spec")  # refuses the standard library
        if target.kind == "hf":
            _framework("transformers")
    else:
        desc = call.get("model") or {}
        target = _module(
            {**desc, "state": call.get("weights")}, bundle.data("weights.npz"), "model"
        )
    prop, dtype = call["property"], call["dtype"]
    checker = models.Checker(
        target,
        inputs,
        seed=int(call["seed"]),
        max_parameters=int(call.get("max_parameters", models.MAX_PARAMETERS)),
        weights=call.get("loss_weights"),  # bundles before it: drawn from the seed
        shrink=False,  # the verdict is replayed; its shrink is in report.json
    )
    try:
        checker.build()
    except models.UnbuildableError:
        return checker.run(prop, dtype)  # the unbuildable report, its reason
    model = checker._built[0]
    if checker.framework == "tensorflow":
        if checker.spec is not None and checker.spec.kind == "keras":
            if dtype != "float32":
                model = checker._keras_in(dtype)[0]
        _load_keras_weights(model, bundle.data("weights.npz"), call.get("weights"))
    elif spec is not None:
        _load_torch_state(model, bundle.data("weights.npz"), call.get("weights"))
    return checker.run(prop, dtype)


def _replay_audit(bundle: Bundle) -> CheckReport:
    from gradcheck import audit
    from gradcheck._quiet import quiet
    from gradcheck.architectures import ModelSpec

    call = bundle.call
    fws = str(call["framework"]).split("+")
    for fw in fws:
        if fw not in audit.FRAMEWORKS:
            raise ReproBundleError(f"audit: unknown framework {fw!r}.")
        _framework(fw)
    device = "cpu" if str(call.get("device", "cpu")) in ("cpu", "/CPU:0") else "auto"
    seed = int(call["audit_seed"])
    found = [j for j in audit.jobs(fws, seed, device) if j.name == call["job"]]
    if not found:
        raise ReproBundleError(
            f"audit: this gradcheck has no audit job {call['job']!r} here (another "
            "gradcheck version, or a device this machine lacks)."
        )
    job = found[0]
    if job.skip is not None:
        raise ReproBundleError(f"audit: job {job.name!r} is skipped here: {job.skip}")
    try:
        spec = ModelSpec.from_dict(call["spec"])
    except GradcheckError as exc:
        raise ReproBundleError(f"audit: the stored spec is invalid ({exc}).") from None
    batch = _decode(call["batch"], bundle.data("batch.npz"), "batch")
    with quiet():
        report = job.check(spec, batch, int(call["check_seed"]))
    report.label = bundle.doc.get("label") or job.name
    return report


# -------------------------------------------------- variants / devices bundles
#: the failing tensor names a variants bundle keeps (to tell, on replay, whether
#: the variant that failed was skipped here)
FAILING_NAMES = 64


def write_variants_bundle(
    repro_dir: Any,
    report: CheckReport,
    entry: str,
    loss_fn: Any,
    model: Any,
    batch: Any,
    *,
    request: Any,
    seed: int,
    rtol: float | None,
) -> Path | None:
    """A bundle for a failing :func:`gradcheck.check_variants` (``entry``
    "check_variants", ``request`` its ``variants=``) or
    :func:`gradcheck.check_devices` ("check_devices", ``request`` its
    ``devices=``): ``loss_fn`` by ``module:qualname`` (or as a method of the
    model), the model (torch: a module-level object of ``loss_fn``'s module, or
    its class constructible with no arguments, with its state_dict, train/eval
    flags and frozen parameters; Keras: its JSON config and weights, custom
    classes by name), the batch, the request *as given* (``"auto"`` resolves to
    the devices of the machine that replays: a bundle recorded with a GPU is
    reported skipped, not passed, where there is none), seed and rtol."""

    def describe(data: _Data, reasons: list[str]) -> _Described:
        model_desc = _variants_model_desc(model, loss_fn, data, reasons)
        # loss_fn receives the model as its argument: a model rebuilt from its
        # class is the one it uses (no "reads params from elsewhere" reason)
        fn_desc = _fn_desc(loss_fn, model, None, data, reasons, "loss_fn", None)
        batch_desc = _encoded(batch, data, "inputs.npz", "batch", reasons)
        key = "variants" if entry == "check_variants" else "devices"
        call: dict[str, Any] = {
            "entry": entry,
            "loss_fn": fn_desc,
            "model": model_desc,
            "batch": batch_desc,
            key: _request_desc(request, key, reasons),
            "options": {"seed": int(seed), "rtol": rtol},
            # informational: which variant/device's tensors failed, so that a
            # replay where that variant is skipped says so (see replay)
            "failing": [
                t.name for t in report.tensors if t.status not in ("passed", "skipped")
            ][:FAILING_NAMES],
        }
        name = report.label or fn_desc.get("name") or entry
        return f"{name}-{report.property}-{report.dtype}", call

    # the audit's own loss is gradcheck's own: the audit writes its bundle
    return _write_failing(repro_dir, report, describe, loss_fn)


def _request_desc(request: Any, key: str, reasons: list[str]) -> Any:
    """``variants=`` / ``devices=`` as JSON: None, a name, or a list of names
    (a ``torch.device`` as its name)."""
    if request is None or isinstance(request, str):
        return request
    if type(request).__name__ in ("device", "DeviceSpec"):
        return str(request)
    try:
        return [str(x) for x in request]
    except TypeError:
        reasons.append(f"{key}= is a {type(request).__name__}, not names")
        return None


def _variants_model_desc(
    model: Any, near: Any, data: dict[str, _Arrays], reasons: list[str]
) -> dict[str, Any]:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return {
            **_torch_desc(model, near, "the model", data, reasons),
            # a state_dict holds neither: dropout/BatchNorm behave by the mode,
            # and only parameters that require grad are compared
            # where the model lived: its home is the reference device
            "device": next(
                (str(t.device) for t in [*model.parameters(), *model.buffers()]),
                "cpu",
            ),
            "training": [n for n, m in model.named_modules() if m.training],
            "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        }
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return {"kind": "keras", **_keras_model_desc(model, data, reasons)}
    reasons.append(
        f"the model is a {type(model).__module__}.{type(model).__qualname__}: a "
        "replay rebuilds a torch nn.Module or a keras.Model"
    )
    return {"kind": type(model).__name__}


def _keras_model_desc(
    model: Any, data: dict[str, _Arrays], reasons: list[str]
) -> dict[str, Any]:
    """A Keras model as data: Keras' JSON config, custom classes by name, the
    weights (weights.npz)."""
    try:
        arch = json.loads(model.to_json())
    except Exception as exc:  # noqa: BLE001 - a subclass without get_config
        arch = None
        reasons.append(f"Keras cannot write the model's config ({exc})")
    custom = _keras_custom_objects(model, reasons)
    meta = _store_weights(model, data, keras=True)
    return {"keras_model": arch, "custom_objects": custom, "weights": meta}


def _rebuild_keras_model(
    desc: Mapping[str, Any],
    bundle: Bundle,
    *,
    compile_config: Any = None,
    custom_what: str = "custom class",
) -> Any:
    """The Keras model ``desc`` records (its config, ``custom_what`` by name, its
    weights; see :func:`_keras_model_desc`), compiled from ``compile_config``
    when there is one (a check_keras_model bundle's)."""
    keras = _framework("keras")
    custom = {
        str(k): _resolve(str(v), f"custom_objects[{k!r}]")
        for k, v in (desc.get("custom_objects") or {}).items()
    }
    try:
        model = keras.saving.deserialize_keras_object(
            desc["keras_model"], custom_objects=custom, safe_mode=True
        )
        if compile_config is not None:
            model.compile_from_config(compile_config)
    except (TypeError, ValueError) as exc:
        raise ReproBundleError(
            f"Keras cannot rebuild the model from the bundle's config ({exc}); a "
            f"{custom_what} must be importable here."
        ) from None
    _load_keras_weights(model, bundle.data("weights.npz"), desc.get("weights"))
    return model


@contextlib.contextmanager
def _torch_flags(module: Any, desc: Mapping[str, Any]) -> Iterator[None]:
    """The recorded train/eval flags and frozen parameters set on ``module``,
    its own put back afterwards."""
    modes = {n: m.training for n, m in module.named_modules()}
    grads = {n: p.requires_grad for n, p in module.named_parameters()}
    training = set(desc.get("training") or [])
    frozen = set(desc.get("frozen") or [])
    try:
        if "training" in desc:
            for n, m in module.named_modules():
                m.training = n in training
        for n, p in module.named_parameters():
            p.requires_grad_(n not in frozen)
        yield
    finally:
        subs = dict(module.named_modules())
        for n, mode in modes.items():
            subs[n].training = mode
        params = dict(module.named_parameters())
        for n, flag in grads.items():
            params[n].requires_grad_(flag)


@contextlib.contextmanager
def _variants_model(desc: Any, bundle: Bundle) -> Iterator[Any]:
    """The model a variants/devices bundle describes, for the replay's length;
    a module-level object of the user's module is put back as it was."""
    if not isinstance(desc, Mapping):
        raise ReproBundleError("model: malformed description")
    kind = desc.get("kind")
    if kind == "keras":
        yield _rebuild_keras_model(desc, bundle)
        return
    if kind != "torch_module":
        raise ReproBundleError(f"model: cannot rebuild a model of kind {kind!r}.")
    torch = _framework("torch")
    if "ref" in desc:
        module = _resolve(desc["ref"], "model")
        if not isinstance(module, torch.nn.Module):
            raise ReproBundleError(f"model: {desc['ref']} is not a torch nn.Module.")
        with (
            _loaded_state(module, bundle, desc.get("state")),
            _torch_flags(module, desc),
        ):
            yield module
        return
    # constructing the class draws its initial weights (overwritten by the
    # stored ones): from a forked generator, so a replay in the user's process
    # leaves torch's random state as it was
    with torch.random.fork_rng(devices=[]):
        module = _module(desc, bundle.data("weights.npz"), "model")
    with _torch_flags(module, desc):
        yield module


def _replay_variants(bundle: Bundle) -> CheckReport:
    """check_variants / check_devices from their bundle."""
    from gradcheck.properties.devices import check_devices
    from gradcheck.properties.variants import check_variants

    call = bundle.call
    options = _options(call, {"seed", "rtol"})
    prop = "devices" if call["entry"] == "check_devices" else "variants"
    away = _gpu_not_here(call["model"], prop)
    if away is not None:
        return away
    batch = _decode(call["batch"], bundle.arrays.get("inputs.npz", {}), "batch")
    check = check_devices if prop == "devices" else check_variants
    with _variants_model(call["model"], bundle) as model:
        loss_fn = _rebuild_fn(call["loss_fn"], model, bundle, "loss_fn")
        return check(
            loss_fn,
            model,
            batch,
            label=bundle.doc.get("label"),
            **{prop: call[prop]},  # variants= / devices=, as given
            **options,
        )


def _gpu_not_here(desc: Any, prop: str) -> CheckReport | None:
    """A "skipped" report when the recorded torch model lived on a GPU this
    machine lacks: its device is the reference, so moving it to the CPU would
    check another thing (and could pass)."""
    if not isinstance(desc, Mapping) or desc.get("kind") != "torch_module":
        return None
    device = str(desc.get("device") or "cpu")
    if not device.startswith("cuda"):
        return None
    torch = _framework("torch")
    index = int(device.partition(":")[2] or 0)
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        return None
    why = (
        f"the model was on {device} when recorded, and torch "
        f"{torch.__version__} sees {torch.cuda.device_count()} GPU(s) here"
    )
    return CheckReport(
        property=prop,
        status="skipped",
        framework="torch",
        device=device,
        dtype="?",
        seed=0,
        mode="skipped",
        error=0.0,
        tolerance=0.0,
        tolerance_reason="nothing could run here; nothing was compared.",
        notes=[f"SKIPPED: {why}", f"device '{device}' skipped: {why}"],
    )


_SKIP_NOTE = re.compile(r"^(?:variant|device) '(?P<name>.+?)' skipped: (?P<why>.*)$")


def _skipped_failures(bundle: Bundle, report: CheckReport) -> str | None:
    """Why the replay could not judge what failed when recorded: the variants
    or devices whose tensors failed then and that were skipped here (a GPU this
    machine lacks), as "no GPU here: ..." when a GPU is what is missing."""
    call = bundle.call
    if call.get("entry") not in ("check_variants", "check_devices"):
        return None
    failing = [str(n) for n in call.get("failing") or []]
    found = []
    for note in report.notes:
        m = _SKIP_NOTE.match(note)
        if m is None:
            continue
        name = m.group("name")
        if not failing or any(n.startswith(f"{name}/") for n in failing):
            found.append((name, m.group("why")))
    if not found and report.status == "skipped":
        # nothing ran here: whatever failed then was not judged now
        found = [
            (m.group("name"), m.group("why"))
            for m in map(_SKIP_NOTE.match, report.notes)
            if m is not None
        ]
    if not found:
        return None
    gpu = any(_needs_gpu(name) or "GPU" in why for name, why in found)
    why = "; ".join(f"'{name}' skipped: {w}" for name, w in found)
    return f"no GPU here: {why}" if gpu else why


def _needs_gpu(name: str) -> bool:
    from gradcheck.properties.variants import parse_variant

    try:
        device = parse_variant(name).device
    except GradcheckError:
        device = name
    return device is not None and any(g in str(device).lower() for g in ("cuda", "gpu"))


# -------------------------------------------------- distributed bundles
def write_distributed_bundle(
    repro_dir: Any,
    report: CheckReport,
    build: Any,
    step: Any,
    batch: Any,
    *,
    world_size: int,
    backend: str,
    wrap: str,
    wrap_kwargs: Mapping[str, Any] | None,
    seed: int,
    rtol: float | None,
    timeout: float,
) -> Path | None:
    """A bundle for a failing :func:`gradcheck.check_distributed`: ``build`` and
    ``step`` by ``module:qualname`` (the check's contract: the ranks import them
    so), the global batch, the world size the check ran with (under torchrun
    the launcher's: a replay spawns that many ranks on one machine), backend,
    wrap and its keyword arguments (JSON), seed, rtol, timeout."""

    def describe(data: _Data, reasons: list[str]) -> _Described:
        names = {}
        for what, fn in (("build", build), ("step", step)):
            names[what] = importable_name(fn)
            if names[what] is None:
                reasons.append(_why_not_importable(fn, what))
        batch_desc = _encoded(batch, data, "inputs.npz", "batch", reasons)
        kwargs = dict(wrap_kwargs or {})
        try:
            json.dumps(kwargs, allow_nan=False)
        except (TypeError, ValueError) as exc:
            kwargs = {k: repr(v) for k, v in kwargs.items()}
            reasons.append(f"wrap_kwargs are not JSON ({exc})")
        ran = report.cost.get("world_size")
        call: dict[str, Any] = {
            "entry": "check_distributed",
            "build": names["build"],
            "step": names["step"],
            "batch": batch_desc,
            "world_size": int(ran) if ran else int(world_size),
            "backend": backend,
            "wrap": wrap,
            "wrap_kwargs": kwargs or None,
            "options": {"seed": int(seed), "rtol": rtol, "timeout": float(timeout)},
        }
        name = report.label or names["step"] or "check_distributed"
        return f"{name}-distributed-{report.dtype}", call

    # the audit's own model is gradcheck's own: the audit writes its bundle
    return _write_failing(repro_dir, report, describe, build, step)


def _replay_distributed(bundle: Bundle) -> CheckReport:
    from gradcheck.properties.distributed import check_distributed

    call = bundle.call
    build = _resolve(call["build"], "build")
    step = _resolve(call["step"], "step")
    batch = _decode(call["batch"], bundle.arrays.get("inputs.npz", {}), "batch")
    kwargs = call.get("wrap_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ReproBundleError("wrap_kwargs: not an object")
    return check_distributed(
        build,
        step,
        batch,
        world_size=int(call["world_size"]),
        backend=str(call["backend"]),
        wrap=str(call["wrap"]),
        wrap_kwargs=kwargs,
        label=bundle.doc.get("label"),
        **_options(call, {"seed", "rtol", "timeout"}),
    )


# -------------------------------------------------- cross-framework bundles
def write_cross_framework_bundle(
    repro_dir: Any,
    report: CheckReport,
    spec: Any,
    batch: Any,
    *,
    dtype: str,
    seed: int,
    rtol: float | None,
) -> Path | None:
    """A bundle for a failing :func:`gradcheck.check_cross_framework`: the spec
    (data: ``ModelSpec.to_dict()``), the batch it ran on (the one drawn from
    ``seed`` when none was given), dtype, seed, rtol. The replay builds the spec
    in both frameworks of the machine it runs on."""

    def describe(data: _Data, reasons: list[str]) -> _Described:
        drawn = batch
        if drawn is None:
            from gradcheck.architectures import random_batch

            drawn = random_batch(spec, 8, seed=seed)  # what the check drew
        call: dict[str, Any] = {
            "entry": "check_cross_framework",
            "spec": spec.to_dict(),
            "batch": _encoded(drawn, data, "batch.npz", "batch", reasons),
            "dtype": dtype,
            "options": {"seed": int(seed), "rtol": rtol},
        }
        return f"{report.label or 'cross_framework'}-{dtype}", call

    return _write_failing(repro_dir, report, describe)


def _replay_cross_framework(bundle: Bundle) -> CheckReport:
    import gradcheck
    from gradcheck.architectures import ModelSpec

    call = bundle.call
    try:
        spec = ModelSpec.from_dict(call["spec"])
    except GradcheckError as exc:
        raise ReproBundleError(f"spec: the stored spec is invalid ({exc}).") from None
    batch = _decode(call["batch"], bundle.arrays.get("batch.npz", {}), "batch")
    return gradcheck.check_cross_framework(
        spec,
        batch,
        dtype=str(call["dtype"]),
        label=bundle.doc.get("label"),
        **_options(call, {"seed", "rtol"}),
    )


#: the rerun of each entry point a bundle records (``call["entry"]``)
_REPLAYS: dict[str, Callable[[Bundle], CheckReport]] = {
    "check_gradients": _replay_gradients,
    "check_model": _replay_model,
    "audit": _replay_audit,
    "check_linearity": _replay_heads,
    "check_locality": _replay_heads,
    "check_training_step": _replay_training,
    "check_keras_model": _replay_keras,
    "check_variants": _replay_variants,
    "check_devices": _replay_variants,
    "check_distributed": _replay_distributed,
    "check_cross_framework": _replay_cross_framework,
}
