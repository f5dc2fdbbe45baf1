"""The TensorFlow / Keras driver of check_variants and check_devices: a model's
gradients eagerly, under XLA (``tf.function(jit_compile=True)``) and on any device
(``tf.device``). The user's model itself runs: Keras models are not cloned
(``keras.models.clone_model`` loses subclassed models' code and custom layers'
state, and a deep copy of a Keras model is not supported); TF places every op by
the ``tf.device`` scope and copies its inputs there (variable reads included), so
one model computes on every device. Every variable loss_fn or gradcheck writes
(BatchNorm statistics, the moved points) is reset after each evaluation and
restored exactly at the end, as are the TF32 switch, op determinism and the
random-number states. See :mod:`gradcheck.properties.variants` for what is
compared and the tolerance."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from gradcheck import devices as dv
from gradcheck.backends import tensorflow as tfb
from gradcheck.backends import tensorflow_devices as tfd
from gradcheck.backends.variants_base import Driver, Evaluation, assemble, same
from gradcheck.errors import NothingToDifferentiateError, UnsupportedInputError
from gradcheck.numeric import tolerance as tl

__all__ = ["TensorflowVariantDriver", "driver", "owns"]

FRAMEWORK = "tensorflow"


def owns(model: Any) -> bool:
    return tfb._is_container(model)


def driver(
    loss_fn: Callable[..., Any], model: Any, batch: Any
) -> TensorflowVariantDriver:
    return TensorflowVariantDriver(loss_fn, model, batch)


@contextlib.contextmanager
def placement(device: str) -> Iterator[None]:
    """Run the block on ``device`` (``tf.device``). The one seam between a
    device's name and the hardware: the tests patch it (with
    :func:`gpu_available`) to run a GPU variant's whole path on the CPU."""
    with tf.device(device):
        yield


def gpu_available(device: str) -> str | None:
    """Why the GPU ``device`` cannot be used here (None: it can)."""
    found = dv.available_devices("tensorflow")
    if device in found:
        return None
    return (
        f"{device} needs a GPU and TensorFlow sees "
        f"{'none' if len(found) < 2 else found[1:]}: "
        "tf.config.list_logical_devices('GPU') has no such device (tensorflow-cpu, "
        "no driver, or CUDA_VISIBLE_DEVICES hides the GPUs)."
    )


def _floating(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, (tf.Tensor, tf.Variable, np.ndarray)):
        dtype = tf.as_dtype(obj.dtype)
        return fn(tf.convert_to_tensor(obj)) if dtype.is_floating else obj
    if isinstance(obj, dict):
        return type(obj)((k, _floating(v, fn)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_floating(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_floating(v, fn) for v in obj)
    return obj


class TensorflowVariantDriver(Driver):
    """Evaluates ``loss_fn(model, batch)`` eagerly or under XLA on a device."""

    framework = "tensorflow"
    switch = "tf.config.experimental.enable_op_determinism()"
    #: gradcheck does not cast a Keras/TF model to float64: the reference is eager
    #: execution in the model's dtype.
    reference_float64 = False
    home = "/CPU:0"

    def __init__(self, loss_fn: Callable[..., Any], model: Any, batch: Any):
        self.loss_fn = loss_fn
        self.model = model
        self.batch = batch
        self.evaluations = 0
        containers, named, _skipped = tfb._collect_params(model)
        tracked: dict[int, Any] = {}
        self._state = tfb._State([])

        def track(v: Any) -> Any:
            key = id(tfb._tf_var(v))
            if key not in tracked:
                tracked[key] = tfb._Var(v)
                self._state.variables.append(tracked[key])
            return tracked[key]

        sources: list[tuple[str, Any]] = []
        seen: set[int] = set()
        for name, v in named:
            var = track(v)
            if id(var.tf_var) in seen or not tfb._is_floating(v):
                continue
            seen.add(id(var.tf_var))
            sources.append((name, var))
        for container in containers:
            for v in container.variables:
                track(v)
        for v in tfb._rng_states(containers):
            track(v).rng = True
        if not sources:
            self._state.restore()
            raise NothingToDifferentiateError(
                "the model has no trainable floating-point variable (build it by "
                "calling it once on an example batch): nothing to compare."
            )
        names = [n for n, _ in sources]
        self.names = [
            n if names.count(n) == 1 else f"{n} (#{i})" for i, n in enumerate(names)
        ]
        self._sources = [var for _, var in sources]
        self.dtypes = {
            n: tl.canonical_dtype(var.tf_var.dtype)
            for n, var in zip(self.names, self._sources, strict=True)
        }
        self._tf32_enabled = tf.config.experimental.tensor_float_32_execution_enabled()

    def _reset_rng(self) -> None:
        """Every random-number state back to the check's start before each
        evaluation: the model's seed generators, TF's global generator, Keras'
        global seed generator, NumPy, Python. (An op seeded from the global seed
        draws anew on every call: its op seed advances and cannot be reset.)"""
        for v in self._state.variables:
            if v.rng:
                v.reset()
        st = self._state
        if st.tf_generator is not None:
            st.tf_generator.state.assign(st.tf_generator_state)
        if st.keras_seed is not None:
            st.keras_seed.reset()
        np.random.set_state(st.rng_np)
        random.setstate(st.rng_py)

    def supported(self, variant: Any) -> None:
        """Raise UnsupportedInputError for a variant TensorFlow has no form of."""
        if variant.compiled or variant.autocast:
            what = "'compile'" if variant.compiled else "autocast"
            raise UnsupportedInputError(
                f"variant '{variant.name}': {what} is a torch variant; for a "
                "TensorFlow/Keras model use 'xla' (jit_compile=True) and devices "
                "(mixed-precision policies are not supported yet)."
            )

    def unavailable(self, variant: Any) -> str | None:
        device = dv.canonical("tensorflow", variant.device or self.home)
        return gpu_available(device) if dv.known_gpu(device) else None

    def precision(self) -> str:
        order = ["float16", "bfloat16", "float32", "float64"]
        known = [d for d in self.dtypes.values() if d in order]
        return max(known, key=order.index) if known else "float32"

    def evaluate(self, how: Evaluation) -> dict[str, Any]:
        """See :meth:`Driver.gradients`; ``xla``: the loss and its gradient in one
        ``tf.function(jit_compile=True)``, called twice (the first call's extra
        time is the compile time). ``seed`` is unused: TensorFlow's random states
        are put back to the check's start before each call instead."""
        if how.float64 or how.autocast or how.compiled or how.magnitude:
            raise UnsupportedInputError(
                "float64 references, autocast, torch.compile and the backward's "
                "magnitude have no TensorFlow form in check_variants."
            )
        where = dv.canonical("tensorflow", how.device or self.home)
        xla, scale = how.xla, how.loss_scale
        watched = [v.tf_var for v in self._sources]
        batch = self.batch
        moved: list[Any] | None = None
        if how.perturb is not None:
            move = _mover(how.perturb)
            moved = [move(v) for v in watched]
            batch = _floating(batch, move)

        def step(b: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(watched)
                loss = self.loss_fn(self.model, b)
                target = loss if scale == 1.0 else loss * tf.cast(scale, loss.dtype)
            grads = tape.gradient(
                target, watched, unconnected_gradients=tf.UnconnectedGradients.NONE
            )
            return loss, grads

        fn = tf.function(step, jit_compile=True) if xla else step
        runs: list[dict[str, Any]] = []
        for _ in range(2 if (xla or how.repeat) else 1):
            self._reset_rng()
            started = time.perf_counter()
            try:
                for v, value in zip(watched, moved or (), strict=False):
                    v.assign(value)
                with self._tf32(how.tf32), placement(where), tfd.op_logging() as log:
                    try:
                        loss, grads = fn(batch)
                    except (tf.errors.OpError, TypeError, ValueError) as exc:
                        if not xla:
                            raise
                        first = (str(exc).strip().splitlines() or [""])[0][:200]
                        raise UnsupportedInputError(
                            "loss_fn could not run under tf.function(jit_compile="
                            f"True): {type(exc).__name__}: {first}"
                        ) from exc
                    _check_loss(loss)
                    value = float(np.asarray(loss.numpy(), np.float64).reshape(()))
                    arrays = {
                        n: None if g is None else tfb._to_numpy(g) / scale
                        for n, g in zip(self.names, grads, strict=True)
                    }
            finally:  # what loss_fn (BatchNorm statistics) or the move wrote
                self._state.reset_variables()
            self.evaluations += 1
            runs.append(
                {
                    "loss": value,
                    "grads": arrays,
                    "seconds": time.perf_counter() - started,
                    "log": log,
                }
            )
        return assemble(runs, compiled=xla)

    def _tf32(self, on: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if on else tfd.tf32_off()

    def probe(self, **kw: Any) -> tuple[list[str], bool | None]:
        flagged: list[str] = []
        results: list[dict[str, Any]] = []
        with tfd.op_determinism(flagged) as switched:
            if switched:
                for _ in range(2):
                    results.append(self.gradients(**kw))
        if not switched:
            return [], None  # it could not be switched back off: not touched
        agrees = same(results[0], results[1]) if len(results) == 2 else None
        return list(dict.fromkeys(flagged)), agrees

    @contextlib.contextmanager
    def tf32_off(self) -> Iterator[None]:
        with tfd.tf32_off():
            yield

    def restore(self) -> None:
        exp = tf.config.experimental
        if exp.tensor_float_32_execution_enabled() != self._tf32_enabled:
            exp.enable_tensor_float_32_execution(self._tf32_enabled)
        self._state.restore()


def _check_loss(loss: Any) -> None:
    if (
        not isinstance(loss, tf.Tensor)
        or not loss.dtype.is_floating
        or int(tf.size(loss)) != 1
    ):
        what = (
            f"a tensor of shape {loss.shape.as_list()} ({loss.dtype.name})"
            if isinstance(loss, tf.Tensor)
            else type(loss).__name__
        )
        raise UnsupportedInputError(
            f"loss_fn(model, batch) must return a scalar floating tensor (the "
            f"loss); got {what}. Reduce it (tf.reduce_mean) as training does."
        )


def _mover(perturb: tuple[int, float]) -> Callable[[Any], Any]:
    """``x -> x (1 + r u)``, u uniform in [-1, 1] from a NumPy generator of the
    given seed, r the relative move but at least one ulp of the tensor's dtype."""
    rng = np.random.default_rng(perturb[0])

    def move(t: Any) -> Any:
        relative = max(perturb[1], tl.eps(tf.as_dtype(t.dtype).name))
        u = rng.uniform(-1.0, 1.0, tuple(t.shape))
        moved = np.asarray(t.numpy(), dtype=np.float64) * (1.0 + relative * u)
        return tf.constant(moved, dtype=t.dtype)

    return move
