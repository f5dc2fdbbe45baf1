"""The variants property's TensorFlow / Keras driver: a model's gradients under XLA
(``tf.function(jit_compile=True)``) and on other devices (``tf.device``). The
user's model itself runs (Keras models are not cloned, see
:mod:`gradcheck.properties.devices`); every variable it or gradcheck writes is reset
after each evaluation and restored exactly at the end. See
:mod:`gradcheck.properties.variants` for what is compared and the tolerance."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from gradcheck import devices as dv
from gradcheck.backends import tensorflow as tfb
from gradcheck.backends.tensorflow_devices import TensorflowDriver, _tf_logging
from gradcheck.errors import UnsupportedInputError

__all__ = ["TensorflowVariantDriver", "driver", "owns"]

FRAMEWORK = "tensorflow"


def owns(model: Any) -> bool:
    return tfb._is_container(model)


def driver(
    loss_fn: Callable[..., Any], model: Any, batch: Any
) -> TensorflowVariantDriver:
    return TensorflowVariantDriver(loss_fn, model, batch)


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


class TensorflowVariantDriver(TensorflowDriver):
    """Evaluates ``loss_fn(model, batch)`` eagerly or under XLA on a device."""

    #: gradcheck does not cast a Keras/TF model to float64: the reference is eager
    #: execution in the model's dtype.
    reference_float64 = False
    home = "cpu"

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
        device = variant.device
        if device is not None and dv.is_gpu(device):
            found = dv.available_devices("tensorflow")
            name = dv.normalize("tensorflow", device)
            if name not in found:
                return (
                    f"{device} needs a GPU and TensorFlow sees "
                    f"{'none' if len(found) < 2 else found[1:]}: "
                    "tf.config.list_logical_devices('GPU') has no such device."
                )
        return None

    def precision(self) -> str:
        order = ["float16", "bfloat16", "float32", "float64"]
        known = [d for d in self.dtypes.values() if d in order]
        return max(known, key=order.index) if known else "float32"

    def gradients(
        self,
        *,
        device: str | None = None,
        autocast: str | None = None,
        compiled: bool = False,
        xla: bool = False,
        perturb: tuple[int, float] | None = None,
        float64: bool = False,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Like :meth:`TorchVariantDriver.gradients`; ``xla``: the loss and its
        gradient in one ``tf.function(jit_compile=True)``, called twice (the first
        call's extra time is the compile time)."""
        if float64 or autocast or compiled:
            raise UnsupportedInputError(
                "float64 references, autocast and torch.compile have no TensorFlow "
                "form in check_variants."
            )
        where = dv.normalize("tensorflow", device or self.home)
        watched = [v.tf_var for v in self._sources]
        batch = self.batch
        try:
            if perturb is not None:
                rng = np.random.default_rng(perturb[0])

                def move(t: Any) -> Any:
                    u = rng.uniform(-1.0, 1.0, tuple(t.shape))
                    moved = np.asarray(t.numpy(), dtype=np.float64) * (
                        1.0 + perturb[1] * u
                    )
                    return tf.constant(moved, dtype=t.dtype)

                for v in watched:
                    v.assign(move(v))
                batch = _floating(batch, move)

            def step(b: Any) -> Any:
                with tf.GradientTape() as tape:
                    tape.watch(watched)
                    loss = self.loss_fn(self.model, b)
                grads = tape.gradient(
                    loss, watched, unconnected_gradients=tf.UnconnectedGradients.NONE
                )
                return loss, grads

            fn = tf.function(step, jit_compile=True) if xla else step
            seconds: list[float] = []
            loss = grads = None
            for _ in range(2 if xla else 1):
                self._reset_rng()
                started = time.perf_counter()
                with tf.device(where), _tf_logging() as log:
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
                    if (
                        not isinstance(loss, tf.Tensor)
                        or not loss.dtype.is_floating
                        or int(tf.size(loss)) != 1
                    ):
                        raise UnsupportedInputError(
                            "loss_fn(model, batch) must return a scalar floating "
                            "tensor (the loss)."
                        )
                    value = float(np.asarray(loss.numpy(), np.float64).reshape(()))
                seconds.append(time.perf_counter() - started)
                random_ops = sorted(log.random)
                self.evaluations += 1
            arrays = {
                n: None if g is None else tfb._to_numpy(g)
                for n, g in zip(self.names, grads, strict=True)
            }
        finally:
            self._state.reset_variables()
        return {
            "loss": value,
            "grads": arrays,
            "seconds": seconds[-1],
            "compile_seconds": max(0.0, seconds[0] - seconds[-1]) if xla else 0.0,
            # random-number ops an eager evaluation ran (XLA draws other numbers
            # than eager from the same seed)
            "random_ops": random_ops,
        }
