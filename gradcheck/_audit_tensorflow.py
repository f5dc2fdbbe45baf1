"""The audit's planted bugs for TensorFlow/Keras (imported only when TF is audited)."""

from __future__ import annotations

import contextlib
import os
import warnings
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


def _assume_something_to_cut(spec: Any, head: str) -> None:
    """Reject (hypothesis ``assume``) an example whose head branches below no
    layer with weights: detaching its input changes no gradient, so there is no
    bug to catch (the audit's candidate test counts any layer but pool/merge as
    having weights; dropout, add and the 2-D pools have none)."""
    from hypothesis import assume

    from gradcheck.architectures.flow import head_branches_below_weights

    assume(head_branches_below_weights(spec, head))


@contextlib.contextmanager
def cut_head(built: Any, head: str) -> Iterator[None]:
    """``tf.stop_gradient`` on the input of ``head``'s first layer with weights
    (every tensor it is called with), for the duration of the block."""
    _assume_something_to_cut(built.spec, head)
    for name in built.spec.head(head).layer_names():
        layer = built.model.get_layer(name)
        if layer.weights:
            break
    original = layer.call

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # every tensor argument: attention reads its input twice (query, value)
        args = tuple(tf.stop_gradient(a) if tf.is_tensor(a) else a for a in args)
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


# ---------------------------------------------------------------- Keras training
TRAINING_PROPERTY = "keras_training"
TRAINING_BUG = "a compute_loss override that detaches the last head's output"


def keras_pairing(spec: Any) -> dict[str, tuple[Any, float]]:
    """Which head's loss and which weight Keras 3.15's CompileLoss gives each output
    of a spec model compiled as the spec says (measured in
    tests/test_keras_regressions.py, read from keras/src/trainers/compile_utils.py):
    Keras flattens dict outputs in sorted key order, pairs a *list* with that
    flattened order, and packs a dict ``loss_weights`` next to a list ``loss`` (or a
    list ``loss_weights`` next to a dict ``loss``) by sorted key position."""
    heads = {h.name: h for h in spec.heads}
    defined = [h.name for h in spec.heads]
    ordered = sorted(defined) if spec.output_structure == "dict" else defined
    w = spec.weights
    if spec.loss_format == "list":
        loss_of = dict(zip(ordered, defined, strict=True))
    else:  # dict: by name; single: one loss for all
        loss_of = {n: n for n in defined}
    if spec.loss_format == "list" and spec.weights_format == "dict":
        weight_of = dict(zip(ordered, sorted(defined), strict=True))
    elif spec.weights_format == "list" and (
        spec.loss_format == "list" or spec.output_structure == "dict"
    ):
        weight_of = dict(zip(ordered, defined, strict=True))
    else:
        weight_of = {n: n for n in defined}
    return {n: (heads[loss_of[n]], w[weight_of[n]]) for n in defined}


def _mispaired(spec: Any) -> list[tuple[Any, Any, float]]:
    """(head, head whose loss Keras applies, weight Keras applies) for every output
    Keras pairs visibly differently from the spec."""
    out = []
    for h in spec.heads:
        given, weight = keras_pairing(spec)[h.name]
        # a weight off by rounding (0.01 vs 0.010000000000000005) is no swap
        off = abs(weight - h.weight) > 1e-2 * max(abs(weight), abs(h.weight))
        if (given.loss, given.from_logits) != (h.loss, h.from_logits) or off:
            out.append((h, given, weight))
    return out


def trainable(spec: Any) -> bool:
    """Specs Keras trains as written (see KNOWN_FRAMEWORK_BUGS for the rest)."""
    return not _mispaired(spec)


def _shows_pairing_bug(spec: Any) -> bool:
    """Keras visibly mis-pairs a loss or a weight, and a mis-paired loss goes to an
    output of the same width and target kind (so the step runs and the bug shows
    in the numbers, not as Keras' own shape error)."""
    wrong = _mispaired(spec)
    return bool(wrong) and all(
        given.units == h.units and _sparse(given) == _sparse(h) for h, given, _ in wrong
    )


def _sparse(head: Any) -> bool:
    """Sparse cross-entropy takes integer labels, the others one column per unit:
    a sparse loss paired with a dense target makes Keras raise a shape error."""
    return str(head.loss).startswith("sparse")


#: Keras 3.15 pairs lists (and dict loss_weights next to a list loss) with outputs
#: in sorted name order, not the order the model defines them (keras#20596,
#: #20346; ../shared/ANCHORS.md): gradcheck must flag every model that shows it
KNOWN_FRAMEWORK_BUGS = [
    (
        "Keras' own sorted-name pairing of list losses/weights (keras#20596)",
        _shows_pairing_bug,
    )
]


def _detach_last(y_pred: Any, last: str) -> Any:
    if isinstance(y_pred, dict):
        return {k: tf.stop_gradient(v) if k == last else v for k, v in y_pred.items()}
    if isinstance(y_pred, (list, tuple)):
        return [*y_pred[:-1], tf.stop_gradient(y_pred[-1])]
    return tf.stop_gradient(y_pred)


def _assume_last_head_trains(built: Any, batch: dict[str, Any], last: str) -> None:
    """Reject (hypothesis ``assume``) an example where detaching the last head's
    output cannot show: its weight is 0, or its loss has an exactly zero gradient
    at the point (a ReLU6 head saturated on every example). A planted bug that
    changes no number is no miss of the check."""
    from hypothesis import assume

    weight = built.loss_weights()[last]
    with tf.GradientTape() as tape:
        value = built.loss_fns(batch)[last]()
    grads = tape.gradient(value, built.model.trainable_variables)
    assume(
        weight != 0
        and any(g is not None and bool(tf.reduce_any(g != 0)) for g in grads)
    )


def training_check(planted: bool) -> Callable[[Any, dict[str, Any], int], Any]:
    """Keras' own compiled train step on a spec model, compiled the way the spec
    says a user writes it (dict/list/single losses and weights, dict or list
    outputs), with Adam. The planted bug is the classic custom ``compute_loss``
    slip: the last head's prediction detached, so its loss trains nothing."""
    import gradcheck
    from gradcheck.architectures import build_keras
    from gradcheck.properties.keras_training import compile_built, keras_data

    def check(spec: Any, batch: dict[str, Any], seed: int) -> Any:
        built = build_keras(spec, "float32")
        if planted:
            _assume_last_head_trains(built, batch, spec.heads[-1].name)
        model = compile_built(built, optimizer="adam")
        if planted:
            original = model.compute_loss
            last = spec.heads[-1].name

            def compute_loss(
                x: Any = None,
                y: Any = None,
                y_pred: Any = None,
                sample_weight: Any = None,
                training: bool = True,
            ) -> Any:
                return original(
                    x=x,
                    y=y,
                    y_pred=_detach_last(y_pred, last),
                    sample_weight=sample_weight,
                    training=training,
                )

            model.compute_loss = compute_loss
        x, y, sample_weight = keras_data(built, batch)
        with warnings.catch_warnings():
            if _mispaired(spec):
                # Keras' sorted-name pairing (keras#20596) hands a from-logits
                # cross-entropy a sigmoid head's output, and Keras says so: the
                # symptom of the bug this job reproduces on purpose, on a model
                # the audit generated; the check itself reports the mispairing
                warnings.filterwarnings("ignore", message=MISPAIRED_LOGITS_WARNING)
            return gradcheck.check_keras_model(
                model, x, y, sample_weight=sample_weight, seed=seed
            )

    return check


#: Keras' warning when a from-logits loss receives a sigmoid's output
MISPAIRED_LOGITS_WARNING = r'"`\w+` received `from_logits=True`, but the `output`'


# ---------------------------------------------------------------- MirroredStrategy
#: check_keras_model on generated models built and compiled under a
#: MirroredStrategy of this many replicas (logical CPUs)
MIRRORED_REPLICAS = 2
MIRRORED_BUG = "a compute_loss override that doubles the loss (MirroredStrategy)"
#: seconds one example may take in the worker before it is ended (a healthy
#: example takes ~2 s on a loaded 2-core machine)
MIRRORED_TIMEOUT = 300.0
#: the worker collects garbage every this many examples (see _serve_mirrored)
MIRRORED_COLLECT_EVERY = 25


def mirrorable(spec: Any) -> bool:
    """Specs whose step under several replicas has the global batch's gradient
    by design: Keras pairs them as written (:func:`trainable`), no dropout
    drawing per replica, no BatchNormalization normalising each replica's shard
    by itself (check_keras_model refuses those two)."""
    return (
        trainable(spec)
        and not spec.stochastic
        and not any(
            layer.kind == "batchnorm" and layer.training
            for _, layer, _ in spec.layers()
        )
    )


def mirrored_jobs(seed: int) -> Iterator[Any]:
    """check_keras_model under ``tf.distribute.MirroredStrategy`` with
    :data:`MIRRORED_REPLICAS` replicas, on correct generated models and with a
    ``compute_loss`` that doubles the loss (must be a mismatch).

    Where the examples run. Two replicas need the CPU split into two logical
    devices *before* TensorFlow initialises its devices, and the audit has done
    that long before this job runs (``jobs()`` lists GPUs first, and the engine
    jobs run models); configuring it at audit start instead would change the
    device list every other TensorFlow job sees. So the examples run in one
    worker process (``python -m gradcheck._audit_tensorflow --mirrored-worker``),
    started on the first example and serving every example of both jobs over a
    pipe (spec as a dict, the batch's NumPy arrays, the CheckReport back,
    pickled); the hypothesis search and its shrinking stay here. ``seed`` is the
    audit's (each example gets its own from hypothesis, as every job)."""
    from gradcheck.audit import Job, _specs

    del seed  # the examples' seeds come from the search, as for every job
    for planted in (None, MIRRORED_BUG):
        yield Job(
            "tensorflow",
            TRAINING_PROPERTY,
            "float32",
            planted,
            _mirrored_check(planted is not None),
            _specs(mirrorable, min_weight=0.01 if planted else 0.0),
            min_batch=2,
            device=f"MirroredStrategy:{MIRRORED_REPLICAS}",
        )


def _mirrored_check(planted: bool) -> Callable[[Any, dict[str, Any], int], Any]:
    def check(spec: Any, batch: dict[str, Any], seed: int) -> Any:
        return _worker().example(spec, batch, seed, planted)

    return check


class _MirroredWorker:
    """The process the MirroredStrategy examples run in (see mirrored_jobs)."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.log: Any = None

    def start(self) -> None:
        import subprocess
        import sys
        import tempfile
        from pathlib import Path

        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, env.get("PYTHONPATH")) if p
        )
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gradcheck._audit_tensorflow",
                "--mirrored-worker",
                str(MIRRORED_REPLICAS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )

    def example(
        self, spec: Any, batch: dict[str, Any], seed: int, planted: bool
    ) -> Any:
        import gradcheck.errors as errors

        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            _send(self.proc.stdin, (spec.to_dict(), batch, seed, planted))
            reply = _receive(self.proc.stdout.fileno(), MIRRORED_TIMEOUT)
        except (OSError, EOFError, TimeoutError) as exc:
            tail = self.stop()
            raise RuntimeError(
                f"the MirroredStrategy worker failed ({type(exc).__name__}: {exc}); "
                f"its last output: {tail}"
            ) from None
        kind = reply[0]
        if kind == "report":
            return reply[1]
        if kind == "assume":
            from hypothesis import assume

            assume(False)
        if kind == "gradcheck_error":
            cls = getattr(errors, reply[1], errors.GradcheckError)
            raise cls(reply[2])
        raise RuntimeError(f"the MirroredStrategy worker raised {reply[1]}\n{reply[2]}")

    def stop(self) -> str:
        """End the worker; the tail of what it wrote to stderr."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
                proc.wait()
        tail = ""
        if self.log is not None:
            self.log.seek(0)
            tail = self.log.read()[-2000:].decode(errors="replace")
            self.log.close()
            self.log = None
        return tail


_WORKER: list[_MirroredWorker] = []


def stop_mirrored_worker() -> None:
    """End the MirroredStrategy worker now (it holds ~0.8 GB; it also ends with
    the audit's process). The next example starts a new one."""
    if _WORKER:
        _WORKER[0].stop()


def _worker() -> _MirroredWorker:
    if not _WORKER:
        import atexit

        _WORKER.append(_MirroredWorker())
        atexit.register(_WORKER[0].stop)
    return _WORKER[0]


def _send(stream: Any, obj: Any) -> None:
    import pickle

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(fd: int, timeout: float | None) -> Any:
    """One pickled frame from ``fd``; TimeoutError after ``timeout`` seconds,
    EOFError when the other side is gone."""
    import pickle
    import select
    import time

    deadline = None if timeout is None else time.monotonic() + timeout

    def exactly(n: int) -> bytes:
        parts, left = [], n
        while left:
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                    raise TimeoutError(f"no answer in {timeout:g} s")
            chunk = os.read(fd, left)
            if not chunk:
                raise EOFError("the pipe closed")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    return pickle.loads(exactly(int.from_bytes(exactly(8), "little")))


def _serve_mirrored(replicas: int) -> None:
    """The worker's loop: two logical CPUs first, then one example per frame."""
    import gc
    import sys
    import time
    import traceback

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
    )
    # the frames go to the real stdout; anything printed goes to stderr
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer.fileno()
    strategy = tf.distribute.MirroredStrategy([f"/CPU:{i}" for i in range(replicas)])
    from hypothesis.errors import UnsatisfiedAssumption

    import gradcheck
    from gradcheck._quiet import quiet

    # Python's garbage collector runs only between examples, every
    # MIRRORED_COLLECT_EVERY of them: a collection among the TensorFlow objects
    # every example leaves took 2-15 s on a loaded 2-core machine (measured with
    # faulthandler during 10 s pauses: "Garbage-collecting"), and landing in a
    # replica thread's tracing it stalled that example for minutes
    gc.collect()
    gc.freeze()
    gc.disable()
    served = 0
    while True:
        try:
            request = _receive(inp, None)
        except EOFError:
            # the interpreter's shutdown can wait on TensorFlow's threads for
            # minutes (seen with the test worker): nothing is left to write
            sys.stderr.flush()
            os._exit(0)
        served += 1
        if served % MIRRORED_COLLECT_EVERY == 0:
            gc.collect()
        started = time.process_time()
        try:
            with quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = _mirrored_example(strategy, *request)
            # the audit times the search in its own process: the worker's CPU
            # time for the example travels with the report
            report.cost["worker_cpu_seconds"] = time.process_time() - started
            reply: tuple[Any, ...] = ("report", report)
        except UnsatisfiedAssumption:
            reply = ("assume",)
        except gradcheck.GradcheckError as exc:
            reply = ("gradcheck_error", type(exc).__name__, str(exc))
        except Exception as exc:
            reply = ("crash", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        _send(out, reply)


def _mirrored_example(
    strategy: Any,
    spec_dict: dict[str, Any],
    batch: dict[str, Any],
    seed: int,
    planted: bool,
) -> Any:
    """One example in the worker: the spec built and compiled under the
    strategy as a user writes it (Adam), the batch cut to a multiple of the
    replicas, Keras' distributed step checked."""
    import gradcheck
    from gradcheck.architectures import build_keras
    from gradcheck.architectures.spec import ModelSpec
    from gradcheck.properties.keras_training import compile_built, keras_data

    spec = ModelSpec.from_dict(spec_dict)
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        built = build_keras(spec, "float32")
        model = compile_built(built, optimizer="adam")
    if planted:
        _assume_a_gradient(built, batch)
        original = model.compute_loss

        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            return 2.0 * original(*args, **kwargs)

        model.compute_loss = compute_loss
    x, y, sample_weight = keras_data(built, batch)
    n = len(tf.nest.flatten(x)[0])
    keep = n - n % replicas
    x, y, sample_weight = tf.nest.map_structure(
        lambda a: None if a is None else a[:keep], (x, y, sample_weight)
    )
    return gradcheck.check_keras_model(
        model, x, y, sample_weight=sample_weight, seed=seed
    )


def _assume_a_gradient(built: Any, batch: dict[str, Any]) -> None:
    """Reject an example where doubling the loss changes no number: every
    weighted loss has an exactly zero gradient there (no miss of the check)."""
    from hypothesis import assume

    weights = built.loss_weights()
    with tf.GradientTape() as tape:
        values = {k: f() for k, f in built.loss_fns(batch).items()}
        total = tf.add_n([weights[k] * v for k, v in values.items()])
    grads = tape.gradient(total, built.model.trainable_variables)
    assume(any(g is not None and bool(tf.reduce_any(g != 0)) for g in grads))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--mirrored-worker"]:
        _serve_mirrored(int(sys.argv[2]))
