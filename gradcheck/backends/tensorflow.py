"""TensorFlow / Keras backend.

What is differentiated: floating ``tf.Tensor``s and variables (``tf.Variable`` or
Keras 3 ``keras.Variable``) at the top level of ``inputs``, and ``params`` (a Keras
``Model``/``Layer`` or a ``tf.Module``: its trainable variables; a variable; or a
list/dict of them). ``fn`` usually closes over the model, so the backend substitutes
values by ``assign``-ing into the variables and assigns the original values back
after every call; the exact original values (NumPy copies taken before anything
runs) are assigned once more when the session closes. The model's other variables
(BatchNorm moving statistics, counters) are reset after every call too, so every
evaluation of ``fn`` starts from the user's state as it was.

Random-number state is the exception, as in the torch backend: the seed states of
Keras ``SeedGenerator``s (Dropout, GaussianNoise, ...), ``tf.random.Generator``s
held by a ``tf.Module``, TF's global generator and Keras's global seed generator
advance from one evaluation to the next and are put back only when the session
closes. A ``Dropout`` called with ``training=True`` therefore draws a new mask per
evaluation and the engine reports the function as nondeterministic, instead of
checking one frozen mask.

Placement: the backend computes where the differentiated tensors live. TensorFlow
places an eager op without a device scope on the first GPU whatever its inputs'
device, so when every differentiated tensor lives on one device and the caller has
no ``tf.device`` scope open, each call of ``fn``, its gradients and the backend's
own arithmetic run under ``tf.device(<that device>)``; a scope the caller opened
around the check wins (``with tf.device("/GPU:1"): check_gradients(...)``). Results
come to the host as float64 NumPy copies straight from the device, without an
extra cast op. The float64 reference runs on that same device, not on a CPU copy:
float64 is IEEE binary64 on GPU and CPU alike (TF32 never touches it), and moving
the model to the host for every reference evaluation would cost more than the
GPU's slower float64 (1/2 of float32 on A100/H100, 1/32-1/64 on consumer cards).
Where TF32 is in play for float32 tensors (TF enables it by default on Ampere and
newer GPUs) a note says the analytical gradients carry its rounding.

Reference precision: TensorFlow variables cannot change dtype. When only input
tensors are differentiated, the first evaluation at x + t*d tries float64 copies of
all floating inputs (Chainer's trick); if ``fn`` cannot run that way (a float32
tensor or model captured in a closure, an explicit cast), the backend falls back to
the native precision and says so in the report's notes. When variables are
differentiated, the numerical side runs in their dtype and a note says so.

Reference evaluations run traced: the finite-difference side (``outputs_at``)
calls fn tens to hundreds of times, so fn is traced once per check and precision
as a ``tf.function`` and the graph is kept where its first run equals an eager
call at the same point (see ``TensorflowSession._reference_forward``). The
analytical side and every gradient stay eager.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradcheck.backends import _keras64
from gradcheck.backends.base import (
    Session,
    TensorSpec,
    flatten_outputs,
    require_outputs,
)
from gradcheck.errors import NothingToDifferentiateError, UnsupportedInputError
from gradcheck.numeric.tolerance import canonical_dtype

try:
    import keras
except ImportError:  # pragma: no cover - tensorflow without keras
    keras = None

FRAMEWORK = "tensorflow"

_CHECKED_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _keras_tf() -> bool:
    """Keras 3 is importable and runs on TensorFlow."""
    if keras is None:  # pragma: no cover
        return False
    if not hasattr(keras, "Variable"):  # Keras 2: layers are tf.Modules
        return False
    try:
        return keras.backend.backend() == "tensorflow"
    except Exception:  # pragma: no cover - very old or broken keras
        return False


_KERAS_TF = _keras_tf()


def _is_keras_variable(obj: Any) -> bool:
    return _KERAS_TF and isinstance(obj, keras.Variable)


def _is_keras_layer(obj: Any) -> bool:
    return _KERAS_TF and isinstance(obj, keras.layers.Layer)


def _is_variable(obj: Any) -> bool:
    return isinstance(obj, tf.Variable) or _is_keras_variable(obj)


def _is_container(obj: Any) -> bool:
    """A Keras Layer/Model or a tf.Module: something that owns variables."""
    return _is_keras_layer(obj) or isinstance(obj, tf.Module)


def owns(obj: Any) -> bool:
    return isinstance(obj, (tf.Tensor, tf.Variable, tf.Module)) or (
        _KERAS_TF and isinstance(obj, (keras.Variable, keras.layers.Layer))
    )


def _tf_var(v: Any) -> tf.Variable:
    """The tf.Variable holding the state of ``v`` (a Keras Variable wraps one)."""
    if _is_keras_variable(v):
        inner = v.value
        if not isinstance(inner, tf.Variable):
            raise UnsupportedInputError(
                f"the Keras variable {getattr(v, 'path', v.name)!r} is not "
                "initialized. Build the model (call it once on an example batch) "
                "before checking its gradients."
            )
        return inner
    return v


def _dtype(t: Any) -> tf.DType:
    return tf.as_dtype(_tf_var(t).dtype if _is_variable(t) else t.dtype)


def _is_floating(t: Any) -> bool:
    return _dtype(t).is_floating


def _is_float_tensor(t: Any) -> bool:
    return isinstance(t, tf.Tensor) and t.dtype.is_floating


def _is_inexact_tensor(t: Any) -> bool:
    """A floating or complex tf.Tensor (what a float64 reference widens)."""
    return isinstance(t, tf.Tensor) and (t.dtype.is_floating or t.dtype.is_complex)


def _is_inexact(t: Any) -> bool:
    return _dtype(t).is_floating or _dtype(t).is_complex


def _wide(dtype: tf.DType) -> tf.DType:
    """The reference dtype: float64, or complex128 for a complex dtype."""
    return tf.complex128 if dtype.is_complex else tf.float64


#: the real dtype of each complex dtype: a complex tensor is checked as its real
#: and imaginary parts, a tensor of that real dtype
_REAL_OF = {tf.complex128: tf.float64, tf.complex64: tf.float32}


def _real_view(o: tf.Tensor) -> tf.Tensor:
    """A complex tensor as its real and imaginary parts (a trailing dimension of
    2, differentiable; torch.view_as_real's layout)."""
    if not o.dtype.is_complex:
        return o
    return tf.stack([tf.math.real(o), tf.math.imag(o)], axis=-1)


def _to_numpy(t: Any) -> np.ndarray:
    """A float64 host copy. ``.numpy()`` first: one device-to-host copy and the
    widening on the host, exact for every float dtype (bfloat16 via ml_dtypes),
    instead of a cast op TF would place on the default GPU."""
    if isinstance(t, tf.IndexedSlices):
        with tf.device(t.values.device or None):
            t = tf.convert_to_tensor(t)
    value = t.numpy()
    if np.iscomplexobj(value):  # its real and imaginary parts, as the spec says
        return np.stack([value.real, value.imag], axis=-1).astype(np.float64)
    return np.array(value, dtype=np.float64, copy=True)


#: reference evaluations (outputs_at) run fn as a tf.function once the traced
#: graph agreed with an eager call (see TensorflowSession._reference_forward);
#: False: always eager
COMPILED_REFERENCE = True

#: how far a traced reference output may sit from the eager one, in ulps of the
#: output's largest element (grappler may reassociate a sum; a real difference,
#: a random draw or a stale value, is far larger)
_COMPILED_ULPS = 16


def _same_outputs(
    eager: list[tuple[str, tf.Tensor]], traced: list[tuple[str, tf.Tensor]]
) -> bool:
    """The traced function's outputs are the eager ones (see _reference_forward)."""
    if len(eager) != len(traced):
        return False
    for (n1, a), (n2, b) in zip(eager, traced, strict=True):
        if n1 != n2 or a.dtype != b.dtype or a.shape != b.shape:
            return False
        x, y = a.numpy(), b.numpy()
        if not np.array_equal(np.isfinite(x), np.isfinite(y)):
            return False
        finite = np.isfinite(x)
        if not np.array_equal(x[~finite], y[~finite], equal_nan=True):
            return False
        if not finite.any():
            continue
        x, y = x[finite], y[finite]
        scale = float(np.max(np.abs(x)))
        eps = float(np.finfo(x.dtype).eps) if np.issubdtype(x.dtype, np.inexact) else 0
        if float(np.max(np.abs(x - y))) > _COMPILED_ULPS * eps * scale:
            return False
    return True


@contextlib.contextmanager
def _no_deprecation_notes() -> Any:
    """TensorFlow's one-time deprecation notes off while gradcheck traces fn (a
    Keras loss calls squeeze(squeeze_dims=...) in graph mode): gradcheck's noise,
    not the user's code's. (tf's own deprecation.silence does not restore the
    flag when the block raises.)"""
    try:
        from tensorflow.python.util import deprecation
    except ImportError:  # pragma: no cover - private module moved
        yield
        return
    before = deprecation._PRINT_DEPRECATION_WARNINGS
    deprecation._PRINT_DEPRECATION_WARNINGS = False
    try:
        yield
    finally:
        deprecation._PRINT_DEPRECATION_WARNINGS = before


def _unfused_call_options() -> Any:
    """This thread's function-call options with grappler's remapper off, for the
    traced reference forward (None where TensorFlow's private API moved: the
    defaults then). The remapper fuses ops (MatMul + BiasAdd + activation) into
    kernels eager mode never runs, and on a CPU with oneDNN it logs "Not
    handling type DT_DOUBLE" for every float64 candidate: off, the graph runs the
    ops eager mode runs, quietly."""
    try:
        import copy

        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
        from tensorflow.python.eager import context as tf_context

        current = tf_context.context().function_call_options
        config = config_pb2.ConfigProto()
        config.ParseFromString(current.config_proto_serialized)
        config.graph_options.rewrite_options.remapping = (
            rewriter_config_pb2.RewriterConfig.OFF
        )
        options = copy.copy(current)
        options.config_proto_serialized = config
        return options
    except Exception:  # pragma: no cover - private API moved
        return None


def _device(raw: str) -> str:
    """'/job:localhost/replica:0/task:0/device:GPU:0' -> 'gpu:0'; CPU -> 'cpu'."""
    if not raw:
        return "cpu"
    last = raw.rsplit("device:", 1)[-1].lower()
    kind, _, index = last.partition(":")
    if kind == "cpu":
        return "cpu"
    return f"{kind}:{index}" if index else kind


def _var_label(v: Any) -> str | None:
    path = getattr(v, "path", None)
    if path:
        return str(path)
    name = getattr(v, "name", None)
    return str(name).removesuffix(":0") if name else None


class _Var:
    """A variable of the user's: its tf.Variable, and its value before the check.

    ``rng``: a random-number state (a seed generator's), which evaluations advance
    freely; it is put back by :meth:`restore` only, never by :meth:`reset`."""

    def __init__(self, var: Any, rng: bool = False):
        self.var = var
        self.tf_var = _tf_var(var)
        self.rng = rng
        with tf.device(self.tf_var.device or None):
            self.original = self.tf_var.numpy().copy()  # exact bits, for restore()
            # The same value as an immutable tensor on the variable's device:
            # cheap to assign back after every call of fn.
            self.original_tensor = tf.constant(self.original, dtype=self.tf_var.dtype)

    def reset(self) -> None:
        self.tf_var.assign(self.original_tensor)

    def restore(self) -> None:
        self.tf_var.assign(self.original)


def _global_generator() -> Any:
    """TF's global tf.random.Generator if it was created; never creates it."""
    try:
        from tensorflow.python.ops import stateful_random_ops
    except ImportError:  # pragma: no cover - private module moved
        return None
    return getattr(stateful_random_ops, "global_generator", None)


def _keras_seed_generator() -> Any:
    """Keras's global SeedGenerator (keras.random.* without a seed) if it exists."""
    if not _KERAS_TF:  # pragma: no cover
        return None
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - private module moved
        return None
    return global_state.get_global_attribute("global_seed_generator")


def _rng_states(containers: Sequence[Any]) -> list[Any]:
    """The random-number state variables the containers hold: the state of every
    Keras SeedGenerator their layers own (Dropout & co.) and of every
    tf.random.Generator a tf.Module holds (not among its ``variables``)."""
    found: list[Any] = []
    for container in containers:
        if _is_keras_layer(container) and hasattr(container, "_flatten_layers"):
            for layer in container._flatten_layers(include_self=True, recursive=True):
                for gen in getattr(layer, "_seed_generators", None) or ():
                    state = getattr(gen, "state", None)
                    if state is not None and _is_variable(state):
                        found.append(state)
        if isinstance(container, tf.Module):
            gens = container._flatten(
                predicate=lambda x: isinstance(x, tf.random.Generator)
            )
            found.extend(g.state for g in gens)
        for v in getattr(container, "variables", ()):
            # a SeedGenerator the layer tracker missed still has this name
            label = _var_label(v) or ""
            if label.rsplit("/", 1)[-1] == "seed_generator_state":
                found.append(v)
    return found


class _State:
    """Everything of the user's that a check could disturb, and how to put it back."""

    def __init__(self, variables: list[_Var]):
        self.variables = variables
        self.rng_np = np.random.get_state()
        self.rng_py = random.getstate()
        self.tf_generator = _global_generator()
        self.tf_generator_state = (
            None
            if self.tf_generator is None
            else self.tf_generator.state.numpy().copy()
        )
        seed_gen = _keras_seed_generator()
        state = getattr(seed_gen, "state", None)
        self.keras_seed = None if state is None else _Var(state)

    def reset_variables(self) -> None:
        """Undo what a call of fn did to the variables, except advancing RNGs."""
        for v in self.variables:
            if not v.rng:
                v.reset()

    def restore(self) -> None:
        errors: list[BaseException] = []
        for v in self.variables:
            try:
                v.restore()
            except Exception as exc:  # restore the rest, then report
                errors.append(exc)
        if self.tf_generator is not None:
            from tensorflow.python.ops import stateful_random_ops

            if stateful_random_ops.global_generator is not self.tf_generator:
                tf.random.set_global_generator(self.tf_generator)
            self.tf_generator.state.assign(self.tf_generator_state)
        if self.keras_seed is not None:
            self.keras_seed.restore()
        np.random.set_state(self.rng_np)
        random.setstate(self.rng_py)
        if errors:
            raise errors[0]


def _collect_params(params: Any) -> tuple[list[Any], list[tuple[str, Any]], list[str]]:
    """(containers, [(name, variable)], skipped) for everything in ``params``."""
    if params is None:
        return [], [], []
    if _is_container(params):
        return [params], *_container_vars(params, "")
    if _is_variable(params):
        return [], [(getattr(params, "path", None) or "params", params)], []
    if isinstance(params, dict):
        items = [(str(k), p, False) for k, p in params.items()]
    elif isinstance(params, (list, tuple)):
        items = [(f"params[{i}]", p, True) for i, p in enumerate(params)]
    else:
        kind = type(params).__name__
        hint = (
            " A tensor holds no state fn could close over: pass it in inputs instead."
            if isinstance(params, tf.Tensor)
            else ""
        )
        raise UnsupportedInputError(
            "params must be a keras Model/Layer, a tf.Module, a variable, or a "
            f"list/dict of them; got {kind}.{hint}"
        )
    containers: list[Any] = []
    named: list[tuple[str, Any]] = []
    skipped: list[str] = []
    for name, p, positional in items:
        if _is_container(p):
            containers.append(p)
            sub, sub_skipped = _container_vars(p, name + ".")
            named.extend(sub)
            skipped.extend(sub_skipped)
        elif _is_variable(p):
            path = getattr(p, "path", None) if positional else None
            named.append((str(path) if path else name, p))
        else:
            raise UnsupportedInputError(
                f"params entry {name!r} is a {type(p).__name__}, not a TensorFlow "
                "variable, keras Model/Layer or tf.Module."
                + (
                    " Tensors are immutable: pass them in inputs instead."
                    if isinstance(p, tf.Tensor)
                    else ""
                )
            )
    return containers, named, skipped


def _container_vars(
    container: Any, prefix: str
) -> tuple[list[tuple[str, Any]], list[str]]:
    named = [
        (prefix + (_var_label(v) or f"variable[{i}]"), v)
        for i, v in enumerate(container.trainable_variables)
    ]
    trainable = {id(_tf_var(v)) for _, v in named}
    skipped = [
        f"'{prefix}{_var_label(v)}' (trainable=False)"
        for v in container.variables
        if id(_tf_var(v)) not in trainable and _is_floating(v)
    ]
    return named, skipped


class TensorflowSession(Session):
    framework = FRAMEWORK

    def __init__(self, fn: Callable[..., Any], inputs: Sequence[Any], params: Any):
        super().__init__()
        self.fn = fn
        self.inputs = list(inputs)
        self._state = _State([])
        try:
            self._setup(params)
        except BaseException:
            self._state.restore()
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, params: Any) -> None:
        containers, named_params, skipped = _collect_params(params)
        # Every variable whose value could change: the differentiated ones and the
        # containers' other variables (statistics, seed states). Keyed by the
        # underlying tf.Variable: a keras Variable and its .value are one state.
        state: dict[int, _Var] = {}

        def track(v: Any) -> _Var:
            key = id(_tf_var(v))
            if key not in state:
                state[key] = _Var(v)
                self._state.variables.append(state[key])
            return state[key]

        specs: list[TensorSpec] = []
        # ("input", index, None) | ("variable", index or None, _Var)
        self.diff: list[tuple[str, int | None, _Var | None]] = []
        seen: set[int] = set()
        for i, x in enumerate(self.inputs):
            if _is_variable(x) and _dtype(x).is_complex:
                raise UnsupportedInputError(
                    f"inputs[{i}] is a complex variable; gradcheck checks complex "
                    "TensorFlow tensors passed as inputs (tf.constant), not complex "
                    "variables: pass its value as an input of fn."
                )
            if isinstance(x, tf.Tensor) and x.dtype.is_complex:
                self.diff.append(("input", i, None))
                specs.append(self._spec(f"inputs[{i}]", x, "input"))
                continue
            if _is_variable(x):
                tracked = track(x)
                if not _is_floating(x):
                    skipped.append(f"inputs[{i}] ({canonical_dtype(_dtype(x))})")
                    continue
                if id(tracked.tf_var) in seen:
                    continue
                seen.add(id(tracked.tf_var))
                self.diff.append(("variable", i, tracked))
                specs.append(self._spec(f"inputs[{i}]", tracked.tf_var, "input"))
            elif isinstance(x, tf.Tensor):
                if not x.dtype.is_floating:
                    skipped.append(
                        f"inputs[{i}] ({canonical_dtype(x.dtype)}: integer and bool "
                        "tensors have no gradient)"
                    )
                    continue
                self.diff.append(("input", i, None))
                specs.append(self._spec(f"inputs[{i}]", x, "input"))
            elif isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
                skipped.append(
                    f"inputs[{i}] (a NumPy array: pass tf.constant(...) to "
                    "differentiate it)"
                )
        for name, v in named_params:
            tracked = track(v)
            if id(tracked.tf_var) in seen:
                continue
            seen.add(id(tracked.tf_var))
            if _dtype(v).is_complex:
                raise UnsupportedInputError(
                    f"'{name}' is complex; gradcheck checks real tensors."
                )
            if not _is_floating(v):
                skipped.append(f"'{name}' ({canonical_dtype(_dtype(v))})")
                continue
            self.diff.append(("variable", None, tracked))
            specs.append(self._spec(name, tracked.tf_var, "parameter"))
        for container in containers:
            for v in container.variables:
                track(v)
        for v in _rng_states(containers):
            # seed states advance between evaluations (dropout draws new masks)
            # and are restored when the session closes
            track(v).rng = True
        if not specs:
            found = "; skipped: " + ", ".join(skipped[:12]) if skipped else ""
            if len(skipped) > 12:
                found += f" and {len(skipped) - 12} more"
            raise NothingToDifferentiateError(
                "nothing to differentiate: no floating-point tensor or variable in "
                f"inputs or params{found}. Pass params=model (its trainable "
                "variables are checked; build the model first), a tf.Variable or a "
                "list/dict of them, or floating tf.Tensor inputs; integer tensors "
                "have no gradient."
            )
        for spec in specs:
            if spec.dtype not in _CHECKED_DTYPES:
                raise UnsupportedInputError(
                    f"'{spec.name}' has dtype {spec.dtype}, which gradcheck does not "
                    "check."
                )
        names = [s.name for s in specs]
        self.specs = [
            s
            if names.count(s.name) == 1
            else TensorSpec(f"{s.name} (#{i})", s.shape, s.dtype, s.device, s.kind)
            for i, s in enumerate(specs)
        ]
        self._has_variables = any(kind == "variable" for kind, _, _ in self.diff)
        # Keras 3 variables can be re-pointed at float64 shadows for reference
        # evaluations (see _keras64); plain tf.Variables cannot change dtype
        self._keras64 = self._has_variables and all(
            _keras64.is_keras_variable(var.var)
            for kind, _, var in self.diff
            if kind == "variable"
        )
        self._layers = _keras64.layers_of(containers) if self._keras64 else []
        self._shadows = _keras64.Float64Shadows()
        self._tf_promotion = True  # TF dtype promotion during float64 evaluations
        if self._has_variables and self.dtype != "float64" and not self._keras64:
            self._promoted: bool | None = False
            self.reference_dtype = self.dtype
            self.notes.append(
                f"the numerical side runs in {self.dtype}, not float64, because "
                "TensorFlow variables cannot change dtype; tolerances are wider. "
                "Build the model in float64 (dtype='float64' or "
                "keras.config.set_floatx('float64')) for a float64 reference."
            )
        else:
            # Decided at the first reference evaluation (float64 variables: no
            # promotion needed, _evaluate ignores the flag for them).
            self._promoted = None
            self.reference_dtype = "float64"
        self._graph: tuple[tf.GradientTape, list[Any], list[Any]] | None = None
        #: a derived function's (see second_order_session) output names, and the
        #: sources of the evaluation in progress (what fn's variables are then)
        self._output_labels: list[str] | None = None
        self._sources_now: list[Any] = []
        #: the traced reference forward per precision (see _reference_forward);
        #: False where fn keeps the eager path
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self._home = self._home_device()
        self._note_tf32()

    def _home_device(self) -> str | None:
        """The device every differentiated tensor lives on (None: several)."""
        found = {
            (self.inputs[ref].device if kind == "input" else var.tf_var.device)
            for kind, ref, var in self.diff
        }
        found.discard("")
        return found.pop() if len(found) == 1 else None

    def _placement(self) -> contextlib.AbstractContextManager[Any]:
        """``tf.device(home)`` unless the caller opened a device scope of its own."""
        if self._home is None:
            return contextlib.nullcontext()
        try:
            from tensorflow.python.eager import context as tf_context

            if tf_context.context().device_name:
                return contextlib.nullcontext()
        except Exception:  # private API moved: leave placement to TF
            return contextlib.nullcontext()
        return tf.device(self._home)

    def _note_tf32(self) -> None:
        """Say so when float32 tensors live on a GPU where TF32 is in play: the
        analytical gradients then carry TF32's rounding, not float32's."""
        from gradcheck.devices import tf32_note

        for device in sorted({s.device for s in self.specs if s.device != "cpu"}):
            if not device.startswith("gpu"):
                continue
            dtypes = [s.dtype for s in self.specs if s.device == device]
            note = tf32_note(FRAMEWORK, device, dtypes)
            if note:
                self.notes.append(note)

    @staticmethod
    def _spec(name: str, t: Any, kind: str) -> TensorSpec:
        if t.dtype.is_complex:  # checked as its real and imaginary parts
            return TensorSpec(
                f"view_as_real({name})",
                (*(int(n) for n in t.shape), 2),
                canonical_dtype(_REAL_OF[t.dtype]),
                _device(t.device),
                kind,
            )
        return TensorSpec(
            name,
            tuple(int(n) for n in t.shape),
            canonical_dtype(t.dtype),
            _device(t.device),
            kind,
        )

    def restore(self) -> None:
        self._graph = None
        self._compiled.clear()
        self._state.restore()

    # ------------------------------------------------------------------ calls
    def _call(self, fn: Callable[..., Any], inputs: list[Any]) -> Any:
        try:
            return fn(*inputs)
        finally:
            self._state.reset_variables()

    def _flatten_plain(self, raw: Any) -> list[tuple[str, tf.Tensor]]:
        """fn's outputs as _flatten compares them, without a derived function's
        labels (its outputs are fn's)."""
        labels, self._output_labels = self._output_labels, None
        try:
            return self._flatten(raw)
        finally:
            self._output_labels = labels

    def _flatten(self, raw: Any) -> list[tuple[str, tf.Tensor]]:
        outs = flatten_outputs(raw, lambda o: isinstance(o, tf.Tensor), _is_inexact)
        require_outputs(outs, raw)
        if self._output_labels is not None and len(outs) == len(self._output_labels):
            outs = [
                (lab, o) for lab, (_, o) in zip(self._output_labels, outs, strict=True)
            ]
        # complex outputs as their real and imaginary parts, inside the taped
        # call: the cotangent of each part is a real number, and the tape
        # differentiates through tf.math.real/imag (TensorFlow's gradient of a
        # real loss w.r.t. z is dL/dRe z + i dL/dIm z, as torch's: measured)
        return [
            (f"view_as_real({n})" if o.dtype.is_complex else n, _real_view(o))
            for n, o in outs
        ]

    def _taped_call(
        self, fn: Callable[..., Any]
    ) -> tuple[tf.GradientTape, Any, list[Any]]:
        """fn at the user's point under a persistent tape watching every source."""
        with self._placement():
            return self._taped_call_placed(fn)

    def _taped_call_placed(
        self, fn: Callable[..., Any]
    ) -> tuple[tf.GradientTape, Any, list[Any]]:
        inputs = list(self.inputs)
        sources: list[Any] = []
        for kind, ref, var in self.diff:
            if kind == "input":
                # A fresh tensor per argument: a closure over the same tensor, or
                # the same tensor passed twice, is not differentiated through.
                inputs[ref] = tf.identity(self.inputs[ref])
                sources.append(inputs[ref])
            else:
                sources.append(var.tf_var)
        self._sources_now = sources
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(sources)
            raw = self._call(fn, inputs)
            if fn is self.fn:  # real views of complex outputs, on the tape
                self._flat = self._flatten(raw)
        return tape, raw, sources

    def analytic(self) -> list[np.ndarray]:
        tape, raw, sources = self._taped_call(self.fn)
        outs = self._flat
        self.forward_count += 1
        self.output_names = [n for n, _ in outs]
        self.output_shapes = [tuple(int(n) for n in o.shape) for _, o in outs]
        self._graph = (tape, [o for _, o in outs], sources)
        return [_to_numpy(o) for _, o in outs]

    def vjp(
        self,
        cotangents: Sequence[np.ndarray],
        retain: bool = False,
        *,
        compact: bool = False,
    ) -> list[np.ndarray | None]:
        assert self._graph is not None, "analytic() first"
        tape, outs, sources = self._graph
        with self._placement():
            grad_outputs = [
                tf.cast(tf.constant(np.asarray(v, dtype=np.float64)), o.dtype)
                for v, o in zip(cotangents, outs, strict=True)
            ]
            grads = tape.gradient(
                outs,
                sources,
                output_gradients=grad_outputs,
                unconnected_gradients=tf.UnconnectedGradients.NONE,
            )
        self.backward_count += 1
        if not retain:
            self._graph = None
        return [None if g is None else _to_numpy(g) for g in grads]

    def value_and_grads(
        self, fn: Callable[..., Any], label: str
    ) -> tuple[float, list[np.ndarray | None]]:
        tape, raw, sources = self._taped_call(fn)
        self.forward_count += 1
        if not _is_float_tensor(raw) or int(tf.size(raw)) != 1:
            shape = (
                list(raw.shape) if isinstance(raw, tf.Tensor) else type(raw).__name__
            )
            raise UnsupportedInputError(
                f"{label} must return a scalar floating tensor (a loss); got {shape}. "
                "Reduce it (tf.reduce_mean/reduce_sum) as your training code does."
            )
        with self._placement():
            grads = tape.gradient(
                raw, sources, unconnected_gradients=tf.UnconnectedGradients.NONE
            )
        self.backward_count += 1
        value = float(np.asarray(raw.numpy(), dtype=np.float64).reshape(()))
        return value, [None if g is None else _to_numpy(g) for g in grads]

    # ------------------------------------------------------------------ reference
    def _base(self, kind: str, ref: int | None, var: _Var | None) -> Any:
        """The original value of a differentiated tensor (an immutable tensor)."""
        return self.inputs[ref] if kind == "input" else var.original_tensor

    def prepare(self, direction: Sequence[np.ndarray | None]) -> Any:
        handles: list[tf.Tensor | None] = []
        for (kind, ref, var), d in zip(self.diff, direction, strict=True):
            if d is None:
                handles.append(None)
                continue
            base = self._base(kind, ref, var)
            with tf.device(base.device or None):
                dd = tf.constant(np.asarray(d, dtype=np.float64))
                if base.dtype.is_complex:  # real pairs -> complex128
                    dd = tf.complex(dd[..., 0], dd[..., 1])
                handles.append(dd)
        return handles

    def values(self) -> list[np.ndarray]:
        """x per differentiated tensor, as float64 arrays."""
        return [_to_numpy(self._base(*entry)) for entry in self.diff]

    def outputs_at(self, handle: Any, t: float) -> list[np.ndarray]:
        if self._promoted is None:
            reason = ""
            # float64 with TF's dtype promotion (float32 constants in fn), then
            # without it (Keras ops that trip the promotion logic), then native
            for promotion in (True, False) if self._keras64 else (True,):
                self._tf_promotion = promotion
                try:
                    outs = self._evaluate(handle, t, promote=True)
                    if all(o.dtype == tf.float64 for _, o in outs):
                        self._promoted = True
                        return self._finish(outs)
                    reason = "its outputs stayed " + canonical_dtype(outs[0][1].dtype)
                except Exception as exc:  # fn cannot run in float64 this way
                    first = (str(exc).strip().splitlines() or [""])[0][:160]
                    reason = f"{type(exc).__name__}: {first}"
            self._promoted = False
            self.reference_dtype = self.dtype
            if self.dtype != "float64":
                self.notes.append(
                    f"the numerical side runs in {self.dtype}, not float64, because "
                    f"fn could not run on float64 copies ({reason}); tolerances are "
                    "wider. Pass the tensors fn reads as inputs (not closure "
                    "variables or a float32 model) to enable it."
                )
        return self._finish(self._evaluate(handle, t, promote=self._promoted))

    def _finish(self, outs: list[tuple[str, tf.Tensor]]) -> list[np.ndarray]:
        arrays = [_to_numpy(o) for _, o in outs]
        self.check_outputs(arrays, "at a finite-difference point")
        return arrays

    def gradients_at(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        *,
        promote: bool,
        handle: Any = None,
        t: float = 0.0,
    ) -> list[list[np.ndarray | None]]:
        """Framework gradients of sum_o <v_o, y_o> at x + t*d (``handle`` from
        :meth:`prepare`; None: at x), one list per cotangent set, as float64 arrays
        (None where a tensor is not connected). ``promote``: run in float64 as the
        reference evaluations do (inputs only; variables keep their dtype), else
        in the native precision."""
        if handle is None:
            handle = [None] * len(self.diff)
        promote = (
            bool(promote)
            and self._promoted is not False
            and self.reference_dtype == "float64"
        )
        persistent = len(cotangent_sets) > 1

        def then(
            tape: tf.GradientTape, outs: list[tuple[str, tf.Tensor]], sources: list
        ) -> list[list[np.ndarray | None]]:
            result = []
            for cot in cotangent_sets:
                grads = tape.gradient(
                    [o for _, o in outs],
                    sources,
                    output_gradients=[
                        tf.cast(tf.constant(np.asarray(v, dtype=np.float64)), o.dtype)
                        for (_, o), v in zip(outs, cot, strict=True)
                    ],
                    unconnected_gradients=tf.UnconnectedGradients.NONE,
                )
                self.backward_count += 1
                result.append([None if g is None else _to_numpy(g) for g in grads])
            return result

        return self._evaluate(handle, t, promote, then, persistent=persistent)

    def _evaluate(
        self,
        handle: Any,
        t: float,
        promote: bool,
        then: Callable[[tf.GradientTape, list[tuple[str, tf.Tensor]], list], Any]
        | None = None,
        persistent: bool = False,
    ) -> Any:
        """Run fn at x + t*d. Without ``then``: return the outputs. With ``then``:
        record fn on a tape watching every differentiated tensor and return
        ``then(tape, outputs, sources)``, called before the variables are reset.
        Everything runs on the tensors' device (see the module docstring)."""
        with self._placement():
            return self._evaluate_placed(handle, t, promote, then, persistent)

    def _evaluate_placed(
        self,
        handle: Any,
        t: float,
        promote: bool,
        then: Callable[[tf.GradientTape, list[tuple[str, tf.Tensor]], list], Any]
        | None,
        persistent: bool,
    ) -> Any:
        promote = bool(promote) and (not self._has_variables or self._keras64)
        shadowed = promote and self._has_variables  # the Keras float64 path

        def cast(x: Any) -> Any:
            return (
                tf.cast(x, _wide(x.dtype)) if promote and _is_inexact_tensor(x) else x
            )

        inputs = [cast(x) for x in self.inputs]
        swaps: list[tuple[Any, tf.Variable]] = []
        try:
            sources: list[Any] = []
            for (kind, ref, var), d in zip(self.diff, handle, strict=True):
                base = cast(self._base(kind, ref, var))
                if shadowed and kind == "variable":
                    base = tf.cast(base, tf.float64)
                if d is None:
                    value = base
                else:
                    wide = _wide(base.dtype)
                    value = tf.cast(
                        tf.cast(base, wide) + tf.constant(t, dtype=wide) * d, base.dtype
                    )
                if kind == "input":
                    if then is not None:
                        # a fresh tensor: closures over the same tensor, or the
                        # same tensor passed twice, are not differentiated through
                        value = tf.identity(value)
                    inputs[ref] = value
                    sources.append(value)
                elif shadowed:
                    shadow = self._shadows.shadow(var.var, value)
                    swaps.append((var.var, shadow))
                    sources.append(shadow)
                else:
                    if d is not None:
                        var.tf_var.assign(value)
                    sources.append(var.tf_var)
            if shadowed:  # the containers' other float variables (statistics)
                done = {id(v) for v, _ in swaps}
                for other in self._state.variables:
                    if (
                        id(other.var) not in done
                        and not other.rng
                        and _keras64.is_keras_variable(other.var)
                        and other.tf_var.dtype.is_floating
                    ):
                        swaps.append(
                            (
                                other.var,
                                self._shadows.shadow(other.var, other.original_tensor),
                            )
                        )

            def scope() -> contextlib.AbstractContextManager[Any]:
                return (
                    _keras64.float64(self._layers, swaps, self._tf_promotion)
                    if shadowed
                    else contextlib.nullcontext()
                )

            self._sources_now = sources
            if then is None:
                key = (promote, shadowed, shadowed and self._tf_promotion)
                outs = self._reference_forward(inputs, key, scope)
            else:
                with scope():
                    with tf.GradientTape(persistent=persistent) as tape:
                        tape.watch(sources)
                        raw = self.fn(*inputs)
                        outs = self._flatten(raw)  # complex: real views, taped
            self.forward_count += 1
            return outs if then is None else then(tape, outs, sources)
        finally:
            self._state.reset_variables()

    # ------------------------------------------------------------ compiled reference
    def _reference_forward(
        self,
        inputs: list[Any],
        key: tuple[Any, ...],
        scope: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> list[tuple[str, tf.Tensor]]:
        """fn's flattened outputs at one finite-difference point, for the
        reference side only (outputs_at: no tape; the analytical side and every
        gradient stay eager, as the user runs fn).

        A finite-difference check evaluates fn tens to hundreds of times at
        nearby points, and an eager Keras call of a small model spends nearly all
        its time in Python (layer and op dispatch, TF's dtype promotion; measured
        with cProfile in the audit's TensorFlow finite-difference jobs: 90% of
        their time, ~0.07 s per call on 2 loaded cores). So fn is traced once per
        session and precision (``key``) as a ``tf.function`` and the traced graph
        runs every later evaluation: the variables it reads (the user's,
        assigned per point, or the float64 shadows, likewise) are read when it
        runs; the input tensors are its arguments.

        The graph is used only where it is the same function: the first
        evaluation runs fn eagerly *and* traced, and the graph is kept only if
        every output agrees with the eager one to a few ulps (same names, dtypes
        and shapes). A fn that cannot be traced (``.numpy()``, Python branches on
        values, variables made on call), draws random numbers (a Dropout in
        training mode: the two runs differ), or whose inputs are not all tensors
        or variables keeps the eager path for the whole session. (The derived
        order-2 function reads its inputs' sources from its arguments and its
        variables' from the session, whose variables and float64 shadows are
        the same objects at every evaluation.) From then on every reference
        evaluation at this
        precision, including the base point, comes from the one graph, so the
        differences compare like with like."""
        compiled = self._compiled.get(key)
        if compiled is False or not self._may_compile(inputs):
            with scope():
                return self._flatten(self.fn(*inputs))
        if compiled is not None:
            # no float64 scope (``scope``: see _keras64): what it switches is
            # Python state, read when the graph was traced; the shadows the
            # graph reads hold this point's values
            try:
                return self._run_compiled(compiled, inputs)
            except Exception:
                # the graph failed at this point (an assertion, check_numerics):
                # fn runs eagerly from here on, so an error of fn's is raised
                # from fn's own code, as the user would see it, not from ours
                self._compiled[key] = False
                with scope():
                    return self._flatten(self.fn(*inputs))
        with scope():
            eager = self._flatten(self.fn(*inputs))
            try:
                with _no_deprecation_notes():
                    compiled = self._compile(inputs)
                got = self._run_compiled(compiled, inputs)
            except Exception:  # not traceable: eager for the rest of the session
                self._compiled[key] = False
                return eager
        if not _same_outputs(eager, got):
            self._compiled[key] = False
            return eager
        self._compiled[key] = compiled
        return got

    def _may_compile(self, inputs: list[Any]) -> bool:
        return COMPILED_REFERENCE and all(
            isinstance(x, (tf.Tensor, tf.Variable)) for x in inputs
        )

    def _compile(self, inputs: list[Any]) -> tuple[list[str], Any]:
        """(output names, the concrete function traced at these inputs' dtypes
        and shapes, which a key's evaluations keep)."""
        fn, flatten = self.fn, self._flatten
        names: list[str] = []

        def body(*args: Any) -> list[tf.Tensor]:
            outs = flatten(fn(*args))
            names[:] = [n for n, _ in outs]
            return [o for _, o in outs]

        # autograph off: fn's Python runs as written (a value-dependent branch
        # fails to trace and keeps the eager path); no XLA (its fusions round
        # differently). The concrete function skips tf.function's per-call
        # signature matching (a third of a call's time on these small graphs).
        traced = tf.function(body, autograph=False, jit_compile=False)
        return names, traced.get_concrete_function(*inputs), _unfused_call_options()

    @staticmethod
    def _run_compiled(
        compiled: tuple[list[str], Any, Any], inputs: list[Any]
    ) -> list[tuple[str, tf.Tensor]]:
        names, concrete, options = compiled
        if options is None:
            outs = concrete(*inputs)
        else:
            from tensorflow.python.eager import context as tf_context

            ctx = tf_context.context()
            before = ctx.function_call_options
            ctx.function_call_options = options
            try:
                outs = concrete(*inputs)
            finally:
                ctx.function_call_options = before
        return list(zip(names, outs, strict=True))

    def unconnected_refusal(self) -> tuple[str, str] | None:
        if self._output_labels is None:  # not a derived (order 2) session
            return None
        return self.specs[0].name, (
            "TensorFlow's gradient of fn is connected to nothing on the outer tape: "
            "no gradient of fn can be differentiated (a tf.custom_gradient whose "
            "gradient function computes in NumPy or tf.numpy_function, or stops "
            "the gradient with tf.stop_gradient). There is no second derivative to "
            "check: write the gradient function in differentiable TensorFlow ops to "
            "use it at order 2."
        )

    # ------------------------------------------------------------------ forward mode
    def jvp(self, direction: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """Forward mode at x, in the user's precision: fn's outputs' tangents along
        ``direction`` from tf.autodiff.ForwardAccumulator (input tensors and
        variables are its primals; ops without a forward rule are differentiated
        by TensorFlow's forward-over-backward, so a tf.custom_gradient's jvp is
        the transpose of its gradient function)."""
        handle = self.prepare(direction)
        with self._placement():
            inputs = list(self.inputs)
            primals: list[Any] = []
            tangents: list[Any] = []
            for (kind, ref, var), d in zip(self.diff, handle, strict=True):
                if d is None:
                    continue
                if kind == "input":
                    x = tf.identity(self.inputs[ref])
                    inputs[ref] = x
                    primals.append(x)
                    tangents.append(tf.cast(d, x.dtype))
                else:
                    primals.append(var.tf_var)
                    tangents.append(tf.cast(d, var.tf_var.dtype))
            try:
                with tf.autodiff.ForwardAccumulator(primals, tangents) as acc:
                    raw = self.fn(*inputs)
                    outs = self._flatten(raw)
                result = [
                    acc.jvp(o, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                    for _, o in outs
                ]
            except (LookupError, NotImplementedError) as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise UnsupportedInputError(
                    "forward mode (ad='forward') is not available for fn: "
                    f"TensorFlow says {type(exc).__name__}: {first}. Check it with "
                    "ad='reverse'."
                ) from exc
            finally:
                self._state.reset_variables()
        self.forward_count += 1
        return [_to_numpy(t) for t in result]


# ---------------------------------------------------------------------- order 2
def second_order_session(
    fn: Callable[..., Any], inputs: Sequence[Any], params: Any, seed: int
) -> TensorflowSession:
    """A session on the derived function g(inputs, grad_outputs) = the gradient
    of <grad_outputs, fn(inputs)> w.r.t. every differentiated tensor, computed
    on an inner tf.GradientTape while the session's own tape records it (nested
    tapes), so that the order-1 engine judges fn's second derivatives: w.r.t.
    inputs and variables, Hessian-vector products; w.r.t. grad_outputs (seeded
    cotangents), the Jacobian the gradient applies. A gradient function that
    stops the gradient (tf.stop_gradient, NumPy inside a tf.custom_gradient)
    is a constant to the outer tape and fails where fn's second derivative is
    not zero. See gradcheck.backends.torch.second_order_session."""
    from gradcheck.numeric.directions import cotangents

    probe = TensorflowSession(fn, inputs, params)
    try:
        probe.analytic()
        assert probe._graph is not None
        outs = probe._graph[1]
        out_names = list(probe.output_names)
        first_specs = list(probe.specs)
        rng = np.random.default_rng([seed, 13])
        with probe._placement():
            grad_outputs = [
                tf.constant(v, dtype=o.dtype)
                for v, o in zip(
                    cotangents([tuple(o.shape) for o in outs], rng), outs, strict=True
                )
            ]
        probe._graph = None
    finally:
        probe.restore()
    n = len(inputs)
    holder: dict[str, Any] = {}

    def derived(*args: Any) -> tuple[Any, ...]:
        session: TensorflowSession = holder["session"]
        xs = list(args[:n])
        vs = list(args[n:])
        # an input's source is the tensor fn receives (the evaluation's own:
        # the same object eagerly, the argument inside the traced reference,
        # see _reference_forward); a variable's is the variable the evaluation
        # reads (the user's, or its float64 shadow: one object per session)
        sources = [
            args[ref] if kind == "input" else src
            for (kind, ref, _), src in zip(
                session.diff, session._sources_now, strict=True
            )
            if not (kind == "input" and ref is not None and ref >= n)
        ]
        # the inputs fn receives are the outer evaluation's own tensors
        with tf.GradientTape() as inner:
            inner.watch(sources)
            raw = fn(*xs)
            ys = [o for _, o in session._flatten_plain(raw)]
        if len(ys) != len(vs):
            raise UnsupportedInputError(
                f"fn returned {len(ys)} floating outputs here and {len(vs)} at the "
                "point: make its output structure depend only on its inputs."
            )
        grads = inner.gradient(
            ys,
            sources,
            output_gradients=[tf.cast(v, y.dtype) for y, v in zip(ys, vs, strict=True)],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return tuple(
            tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
            for g in grads
        )

    session = TensorflowSession(derived, [*inputs, *grad_outputs], params)
    holder["session"] = session
    session._output_labels = [f"grad[{s.name}]" for s in first_specs]
    session.derived_order = 2
    session.specs = [
        TensorSpec(
            f"grad_outputs[{ref - n}]"
            if kind == "input" and ref is not None and ref >= n
            else s.name,
            s.shape,
            s.dtype,
            s.device,
            s.kind,
        )
        for (kind, ref, _), s in zip(session.diff, session.specs, strict=True)
    ]
    session.notes.append(
        "order 2: the function checked is g(inputs, grad_outputs) = the gradient of "
        "<grad_outputs, fn(inputs)> on an inner tf.GradientTape, recorded by the "
        "outer one (grad_outputs: seeded cotangents of "
        + ", ".join(out_names)
        + "); its derivatives w.r.t. the inputs and variables are fn's second "
        "derivatives (Hessian-vector products), w.r.t. grad_outputs the Jacobian "
        "the gradient applies."
    )
    return session
