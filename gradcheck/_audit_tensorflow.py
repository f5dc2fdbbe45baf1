"""The audit's planted bugs for TensorFlow/Keras (imported only when TF is audited)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def scaled_backward(fn: Callable[[], Any], rel: float) -> Callable[[], Any]:
    """``fn`` with a backward ``1 + rel`` times too large."""

    @tf.custom_gradient
    def scaled(x: Any) -> Any:
        return tf.identity(x), lambda g: g * (1 + rel)

    return lambda: scaled(fn())


@contextlib.contextmanager
def cut_head(built: Any, head: str) -> Iterator[None]:
    """``tf.stop_gradient`` on the input of ``head``'s first layer with weights,
    for the duration of the block."""
    for name in built.spec.head(head).layer_names():
        layer = built.model.get_layer(name)
        if layer.weights:
            break
    original = layer.call

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return original(tf.stop_gradient(inputs), *args, **kwargs)

    layer.call = call
    try:
        yield
    finally:
        layer.call = original


def perturbed_builders(rel: float) -> tuple[Any, Any]:
    """(build_torch, a build_keras whose last head's loss is ``1 + rel`` times too
    large): two builds of one spec that are not the same model."""
    from gradcheck.architectures import build_keras, build_torch

    def build(spec: Any, dtype: str) -> Any:
        built = build_keras(spec, dtype)
        last = spec.heads[-1].name
        head_loss = built.head_loss

        def wrong(head: Any, output: Any, target: Any, sw: Any) -> Any:
            loss = head_loss(head, output, target, sw)
            return loss * (1 + rel) if head.name == last else loss

        built.head_loss = wrong
        return built

    return build_torch, build


def on_device(check: Callable[..., Any], device: str) -> Callable[..., Any]:
    """``check`` run under ``tf.device(device)``: the model's ops go there."""

    def run(*args: Any) -> Any:
        with tf.device(device):
            return check(*args)

    return run


def device_loss(built: Any, rel: float | None) -> Callable[[Any, Any], Any]:
    """``loss_fn(model, batch)`` for gradcheck.check_devices (which runs it under
    each ``tf.device``). ``rel``: plant a backward off by ``rel`` on GPUs only."""
    def loss(model: Any, batch: Any) -> Any:
        total = built.total(batch)
        if rel is not None and "GPU" in total.device.upper():
            return scaled_backward(lambda: total, rel)()
        return total

    return loss
