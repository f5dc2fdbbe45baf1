"""The audit: do this machine's frameworks compute the gradients that
total = sum_i w_i * loss_i implies, and does gradcheck see it when they don't?

The audit is a set of *jobs*. Each job is one property (finite differences,
linearity, locality, the training paths, cross-framework agreement) in one
framework and dtype, with an expectation:

* ``correct``: on correct generated multi-head models the property holds;
* ``planted``: with a bug planted in those models, the property catches it: the
  verdict is ``mismatch`` (any other failing status is not a catch).

A job is a hypothesis search for a counterexample to its expectation over generated
specs (:func:`gradcheck.strategies.architectures`) and batches. When one is found,
hypothesis shrinks it to a minimal model, and the outcome carries that model as code
(``spec.to_code``) with the failing report: a reproducer, not a seed to chase.

Frameworks are imported only when audited, and only those installed; a missing one
is reported as skipped.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gradcheck
from gradcheck.result import CheckReport

FRAMEWORKS = ("torch", "tensorflow")
DISTRIBUTIONS = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "keras": ("keras",),
}
DTYPES = ("float64", "float32")
#: examples per job for each profile (``--examples`` overrides); ci: see the README
#: for its seconds (``make audit``, with the CPU it was measured on)
PROFILES = {"ci": 10, "thorough": 60}
#: torch's intra-op threads during the audit: its models are tiny, and torch's
#: thread pool costs more than it gives there (torch/float64/finite_difference on
#: correct models: 8.9 s CPU with torch's 2 threads, 2.3 s with one; 2-core AMD
#: EPYC shared with other work, run_job timed with time.process_time)
DEFAULT_THREADS = 1
#: relative size of the planted scaled-backward bug: the promised detection limits
PLANTED = {"float64": 1e-5, "float32": 1e-3}
#: the finite-difference jobs draw smooth models: a correct model must pass
#: outright (kinks are judged "nondifferentiable", measured in benchmarks/)
SMOOTH_ACTIVATIONS = ("linear", "tanh", "sigmoid", "gelu", "softplus", "elu")
SMOOTH_LOSSES = (
    "mse",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
    "binary_crossentropy",
)


class _Counterexample(Exception):
    """Raised inside the hypothesis search when an example defies the expectation."""


@dataclass
class Job:
    """One property, framework and dtype, and what it is expected to do."""

    framework: str
    property: str
    dtype: str
    planted: str | None  # the bug planted, or None for correct models
    check: Callable[[Any, dict[str, Any], int], CheckReport]
    strategy: Callable[[], Any]
    skip: str | None = None
    min_batch: int = 1
    device: str = "cpu"

    @property
    def batch_options(self) -> dict[str, Any]:
        # a planted bug must be observable: per-head sample weights that are all
        # zero would silence a head, and a missed bug there is no miss at all
        return {
            "min_size": self.min_batch,
            "max_size": 6,
            "sample_weights": self.planted is None,
        }

    @property
    def expect_pass(self) -> bool:
        return self.planted is None

    def as_expected(self, report: CheckReport) -> bool:
        """Whether one example's report meets the job's expectation: correct models
        must pass; a planted bug is caught only by ``mismatch``. Any other failing
        status ("nondifferentiable", "nondeterministic") says the check could not
        judge the gradient, which is no catch."""
        if self.expect_pass:
            return report.passed
        return report.status == "mismatch"

    @property
    def name(self) -> str:
        what = f"planted {self.planted}" if self.planted else "correct models"
        where = "" if self.device in ("cpu", "/CPU:0") else f"/{self.device}"
        return f"{self.framework}{where}/{self.dtype}/{self.property}: {what}"


@dataclass
class Outcome:
    job: Job
    examples: int
    statuses: dict[str, int]
    seconds: float
    report: CheckReport | None = None
    #: CPU time of the job's process (a shared machine inflates ``seconds``)
    cpu_seconds: float = 0.0
    #: the shrunk counterexample: the spec's JSON and its code
    spec: dict[str, Any] | None = None
    code: str | None = None
    error: str | None = None
    shrink_steps: int = 0
    #: the example ``report`` came from, as data: {"spec": spec dict, "batch":
    #: NumPy batch} (a repro bundle's content; not in to_dict)
    example: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.job.skip is not None or (self.error is None and self.spec is None)

    @property
    def verdict(self) -> str:
        if self.job.skip is not None:
            return "skipped"
        if self.error is not None and self.spec is None:
            return "error"
        if self.spec is not None:
            return "counterexample"
        return "holds" if self.job.expect_pass else "caught"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.job.name,
            "framework": self.job.framework,
            "dtype": self.job.dtype,
            "property": self.job.property,
            "planted": self.job.planted,
            "expected": "passed" if self.job.expect_pass else "caught",
            "verdict": self.verdict,
            "ok": self.ok,
            "examples": self.examples,
            "statuses": self.statuses,
            "shrink_steps": self.shrink_steps,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "skip": self.job.skip,
            "error": self.error,
            "spec": self.spec,
            "code": self.code,
            "report": None if self.report is None else self.report.to_dict(),
        }


@dataclass
class AuditResult:
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        ran = [o for o in self.outcomes if o.job.skip is None]
        return bool(ran) and all(o.ok for o in ran)

    def to_dict(self) -> dict[str, Any]:
        ran = [o for o in self.outcomes if o.job.skip is None]
        return {
            "gradcheck_version": gradcheck.__version__,
            "environment": self.environment,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "summary": {
                "jobs": len(ran),
                "ok": sum(o.ok for o in ran),
                "examples": sum(o.examples for o in ran),
                "failed": [o.job.name for o in ran if not o.ok],
                "all_ok": self.ok,
            },
            "cases": [o.to_dict() for o in self.outcomes],
        }


def available(framework: str) -> bool:
    return importlib.util.find_spec(framework) is not None


# ---------------------------------------------------------------- the jobs
def _fw(framework: str) -> Any:
    """The framework-specific planting helpers (imports the framework)."""
    if framework == "torch":
        from gradcheck import _audit_torch as mod
    else:
        from gradcheck import _audit_tensorflow as mod
    return mod


def _build(framework: str, spec: Any, dtype: str, device: str = "cpu") -> Any:
    """The spec built in ``framework``; torch models live on ``device``. (Keras
    models run where the enclosing ``tf.device`` scope puts them.)"""
    from gradcheck.architectures import build_keras, build_torch

    if framework == "torch":
        return build_torch(spec, dtype, device)
    return build_keras(spec, dtype)


def _specs(where: Callable[[Any], bool] | None = None, **kw: Any) -> Callable[[], Any]:
    """A spec strategy (small models), optionally filtered by ``where``."""

    def strategy() -> Any:
        from gradcheck.strategies import architectures

        kw.setdefault("max_heads", 3)
        kw.setdefault("max_layers", 2)
        kw.setdefault("max_units", 6)
        drawn = architectures(**kw)
        return drawn if where is None else drawn.filter(where)

    return strategy


DEVICE_CHOICES = ("auto", "cpu", "cuda", "all")


def jobs(frameworks: list[str], seed: int, device: str = "auto") -> Iterator[Job]:
    """Every job for the audited frameworks and devices, in the order they run.

    ``device``: "auto" (every available device), "cpu", "cuda" or "all" (CPU and
    every GPU; a GPU must exist). Engine properties run on each device; the
    CPU-vs-GPU property runs where there is a GPU and is a skipped job where not."""
    from gradcheck.devices import is_gpu, resolve

    for fw in frameworks:
        found = resolve(fw, device)  # DeviceUnavailableError: asked for a GPU
        for dev in found:
            for dtype in DTYPES:
                more = _higher_order_jobs(fw, dtype, seed) if dev == found[0] else ()
                for job in (*_engine_jobs(fw, dtype, seed, dev), *more):
                    job.device = dev
                    if fw == "tensorflow":
                        job.check = _fw(fw).on_device(job.check, dev)
                    yield job
        yield from _training_jobs(fw, seed)
        if fw == "torch":  # compile, autocast and DDP (gradcheck/_audit_distributed.py)
            from gradcheck import _audit_distributed

            yield from _audit_distributed.jobs(seed)
        if fw == "tensorflow":  # fit's step under MirroredStrategy, 2 logical CPUs
            yield from _fw(fw).mirrored_jobs(seed)
        gpus = [d for d in resolve(fw, "auto") if is_gpu(d)]
        for dtype in DTYPES:
            yield from _device_jobs(fw, dtype, gpus, device)
    if "torch" in frameworks and "tensorflow" in frameworks:
        for dtype in DTYPES:
            yield from _cross_jobs(dtype, seed)


def _higher_order_jobs(fw: str, dtype: str, seed: int) -> Iterator[Job]:
    """Second-order and forward-mode checks (gradcheck/_audit_higher_order.py), on
    the first device only: they judge the framework's autodiff, not a device."""
    from gradcheck import _audit_higher_order

    return _audit_higher_order.jobs(fw, dtype, seed)


def _engine_jobs(fw: str, dtype: str, seed: int, device: str) -> Iterator[Job]:
    smooth = dict(
        activations=SMOOTH_ACTIVATIONS, losses=SMOOTH_LOSSES, allow_regularizers=False
    )
    rel = PLANTED[dtype]

    def fd(planted: bool) -> Callable[[Any, dict[str, Any], int], CheckReport]:
        def check(spec: Any, batch: dict[str, Any], s: int) -> CheckReport:
            built = _build(fw, spec, dtype, device)
            fn = built.total_fn(batch)
            if planted:
                fn = _fw(fw).scaled_backward(fn, rel)
            return gradcheck.check_gradients(fn, params=built.model, seed=s)

        return check

    yield Job(fw, "finite_difference", dtype, None, fd(False), _specs(**smooth))
    yield Job(
        fw,
        "finite_difference",
        dtype,
        f"backward scaled by 1+{rel:g}",
        fd(True),
        # a zero-weight model has a zero gradient, and a scaled zero is no bug
        _specs(**smooth, min_weight=0.01),
    )

    def lin(planted: bool) -> Callable[[Any, dict[str, Any], int], CheckReport]:
        def check(spec: Any, batch: dict[str, Any], s: int) -> CheckReport:
            built = _build(fw, spec, dtype, device)
            w = built.loss_weights()
            if planted:  # the total forgets the last head
                last = spec.heads[-1].name
                total = built.total_fn(batch, dict(spec.weights, **{last: 0.0}))
            else:
                total = built.total_fn(batch)
            return gradcheck.check_linearity(
                total, built.loss_fns(batch), w, params=built.model, seed=s
            )

        return check

    yield Job(fw, "linearity", dtype, None, lin(False), _specs())
    yield Job(
        fw,
        "linearity",
        dtype,
        "the total forgets the last head's loss",
        lin(True),
        _specs(min_heads=2, min_weight=0.01),
    )

    def loc(planted: bool) -> Callable[[Any, dict[str, Any], int], CheckReport]:
        def check(spec: Any, batch: dict[str, Any], s: int) -> CheckReport:
            built = _build(fw, spec, dtype, device)
            if planted:
                head = _cut_candidate(spec)
                with _fw(fw).cut_head(built, head):
                    return _locality(built, batch, s)
            return _locality(built, batch, s)

        return check

    yield Job(fw, "locality", dtype, None, loc(False), _specs())
    yield Job(
        fw,
        "locality",
        dtype,
        "a head's input detached",
        loc(True),
        _specs(min_heads=2, min_weight=0.01),
    )


def _locality(built: Any, batch: dict[str, Any], s: int) -> CheckReport:
    return gradcheck.check_locality(
        built.total_fn(batch),
        built.loss_fns(batch),
        built.loss_weights(),
        expected=built.expected_flow(),
        params=built.model,
        seed=s,
    )


def _cut_candidate(spec: Any) -> str:
    """The last head that branches from a trunk node with parameters above it
    (cutting a head that reads an input directly changes nothing to detect)."""
    from hypothesis import assume

    from gradcheck.architectures.flow import layer_ancestors

    anc = layer_ancestors(spec)
    params = {n for n, layer, _ in spec.layers() if layer.kind not in ("pool", "merge")}
    for h in reversed(spec.heads):
        if anc.get(h.source, frozenset()) & params:
            return h.name
    assume(False)
    raise AssertionError("unreachable")  # assume(False) raises


def _training_jobs(fw: str, seed: int) -> Iterator[Job]:
    """The frameworks' own training paths: gradcheck.check_training_step (torch)
    and gradcheck.check_keras_model (Keras), in float32 as users train."""
    mod = _fw(fw)
    for planted in (None, mod.TRAINING_BUG):
        yield Job(
            fw,
            mod.TRAINING_PROPERTY,
            "float32",
            planted,
            mod.training_check(planted is not None),
            _specs(mod.trainable, min_weight=0.01 if planted else 0.0),
            min_batch=2,
        )
    for bug, where in mod.KNOWN_FRAMEWORK_BUGS:
        # the framework's own bug plays the planted one: gradcheck must flag it
        # on every model that shows it (and a fixed framework turns up as a
        # counterexample, which is news worth a failing audit)
        yield Job(
            fw,
            mod.TRAINING_PROPERTY,
            "float32",
            bug,
            mod.training_check(False),
            _specs(where, min_heads=2, min_weight=0.01),
            min_batch=2,
        )


def _device_jobs(fw: str, dtype: str, gpus: list[str], request: str) -> Iterator[Job]:
    """CPU vs every GPU on generated models: correct, and with a backward bug that
    only exists on the GPU (a kernel that is wrong on one device)."""
    from gradcheck.devices import available_devices

    cpu = available_devices(fw)[0]
    skip = None
    if not gpus:
        skip = f"no GPU visible to {fw} on this machine"
    elif request == "cpu":
        skip = "--device cpu"
    rel = PLANTED[dtype]
    mod = _fw(fw)

    def check(planted: bool) -> Callable[[Any, dict[str, Any], int], CheckReport]:
        def run(spec: Any, batch: dict[str, Any], s: int) -> CheckReport:
            built = _build(fw, spec, dtype)
            return gradcheck.check_devices(
                mod.device_loss(built, rel if planted else None),
                built.model,
                batch,
                devices=[cpu, *gpus],
                seed=s,
            )

        return run

    for planted in (None, f"a GPU-only backward off by {rel:g}"):
        yield Job(
            fw,
            "devices",
            dtype,
            planted,
            check(planted is not None),
            _specs(min_weight=0.01 if planted else 0.0),
            skip=skip,
            device=",".join([cpu, *gpus]) if gpus else "cpu",
        )


def _cross_jobs(dtype: str, seed: int) -> Iterator[Job]:
    def check(planted: bool) -> Callable[[Any, dict[str, Any], int], CheckReport]:
        def run(spec: Any, batch: dict[str, Any], s: int) -> CheckReport:
            if planted:
                from gradcheck.properties import cross_framework

                return cross_framework.run(
                    spec,
                    batch,
                    dtype=dtype,
                    seed=s,
                    builders=_fw("tensorflow").perturbed_builders(PLANTED[dtype]),
                )
            return gradcheck.check_cross_framework(spec, batch, dtype=dtype, seed=s)

        return run

    fw = "torch+tensorflow"
    yield Job(fw, "cross_framework", dtype, None, check(False), _specs())
    yield Job(
        fw,
        "cross_framework",
        dtype,
        f"one Keras weight off by {PLANTED[dtype]:g}",
        check(True),
        _specs(),
    )


# ---------------------------------------------------------------- running
def run_job(
    job: Job,
    examples: int,
    seed: int,
    on_example: Callable[[Job], None] | None = None,
) -> Outcome:
    """Search for a counterexample to ``job``'s expectation; shrink it if found."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    from gradcheck._quiet import quiet
    from gradcheck.strategies import batches

    started, cpu_started = time.perf_counter(), time.process_time()
    if job.skip is not None:
        return Outcome(job, 0, {}, 0.0)
    statuses: Counter[str] = Counter()
    state: dict[str, Any] = {"examples": 0, "shrinks": 0}

    @hseed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(data=st.data())
    def search(data: Any) -> None:
        spec = data.draw(job.strategy(), label="spec")
        batch = data.draw(batches(spec, **job.batch_options), label="batch")
        found = "spec" in state

        def count() -> None:  # an example rejected by assume() is not counted
            if found:
                state["shrinks"] += 1
            else:
                state["examples"] += 1
                if on_example is not None:
                    on_example(job)

        try:
            report = job.check(spec, batch, seed)
        except gradcheck.GradcheckError as exc:
            count()
            state.update(spec=spec, report=None, error=f"{type(exc).__name__}: {exc}")
            raise _Counterexample from None
        count()
        if not found:
            statuses[report.status] += 1
        state["last"] = report
        state["last_example"] = (spec, batch)
        if not job.as_expected(report):
            state.update(spec=spec, report=report, error=None, example=(spec, batch))
            raise _Counterexample

    outcome = Outcome(job, 0, {}, 0.0)
    try:
        # the generated models are gradcheck's: so is their framework noise
        with quiet():
            search()
    except _Counterexample:
        spec = state["spec"]
        outcome.spec = spec.to_dict()
        code_fw = "keras" if job.framework == "tensorflow" else "torch"
        outcome.code = spec.to_code(code_fw, job.dtype)
        outcome.report = state.get("report")
        outcome.error = state.get("error")
        example = state.get("example") if outcome.report is not None else None
    except Exception as exc:  # a crash outside gradcheck's checks: report it
        outcome.error = f"{type(exc).__name__}: {exc}"
        example = None
    else:
        outcome.report = state.get("last")
        example = state.get("last_example")
    if example is not None:
        outcome.example = {"spec": example[0].to_dict(), "batch": example[1]}
    outcome.examples = state["examples"]
    outcome.shrink_steps = state["shrinks"]
    outcome.statuses = dict(statuses)
    outcome.seconds = time.perf_counter() - started
    outcome.cpu_seconds = time.process_time() - cpu_started
    return outcome


def run(
    frameworks: list[str],
    examples: int,
    seed: int,
    on_start: Callable[[Job, int], None] | None = None,
    on_example: Callable[[Job], None] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    device: str = "auto",
    threads: int | None = DEFAULT_THREADS,
    workers: int = 1,
) -> AuditResult:
    """Run every job; raises DeviceUnavailableError (before any work) when
    ``device`` asks for a GPU that is not there. ``threads``: intra-op threads of
    the audited frameworks for the duration (None: leave them as they are).
    ``workers``: processes running jobs side by side (this one and ``workers - 1``
    helpers, see :func:`_run_parallel`); the outcomes are the same as with one."""
    result = AuditResult(environment=environment(frameworks))
    started, cpu_started = time.perf_counter(), time.process_time()
    present = []
    for fw in frameworks:
        if available(fw):
            present.append(fw)
        else:
            result.skipped[fw] = (
                f"{fw} is not installed (pip install 'gradcheck[{fw}]')"
            )
    planned = list(jobs(present, seed, device))
    result.environment.update(_device_environment(present))
    with _intra_op_threads(present, threads) as used:
        if used:
            result.environment["intra-op threads"] = used
        if (
            workers > 1
            and jobs is _PLANNER
            and sum(j.skip is None for j in planned) > 1
        ):
            result.environment["worker processes"] = workers
            calls = _Serialized(on_start, on_example, on_outcome)
            helpers = _Helpers(present, examples, seed, device, threads, planned)
            result.outcomes = _run_parallel(
                planned, examples, seed, workers, calls, helpers
            )
            result.cpu_seconds += sum(helpers.cpu_seconds)
            # the busiest process bounds the audit's time on an otherwise idle
            # machine: this process's CPU seconds, then each helper's
            here = time.process_time() - cpu_started
            result.environment["CPU seconds per process"] = ", ".join(
                f"{c:.1f}" for c in [here, *helpers.cpu_seconds]
            )
        else:
            for i, job in enumerate(planned):
                if on_start is not None:
                    on_start(job, examples)
                out = run_job(job, examples, seed + i, on_example)
                result.outcomes.append(out)
                if on_outcome is not None:
                    on_outcome(out)
    _close_workers()
    result.seconds = time.perf_counter() - started
    result.cpu_seconds += time.process_time() - cpu_started
    return result


def _close_workers() -> None:
    """End the worker processes some jobs keep alive across their examples: the
    DDP jobs' ranks and the MirroredStrategy jobs' worker (spawned helpers skip
    atexit; the workers also leave when their parent dies)."""
    import sys

    mod = sys.modules.get("gradcheck._audit_distributed")
    if mod is not None:
        mod.close()
    mod = sys.modules.get("gradcheck._audit_tensorflow")
    if mod is not None:  # the MirroredStrategy jobs' worker (2 logical CPUs)
        mod.stop_mirrored_worker()


# ---------------------------------------------------------------- side by side
# Jobs are independent and seeded by their place in the plan (seed + i), so any
# process can run any of them with the same outcome. Helpers are fresh (spawned)
# processes: each imports the frameworks itself (forking a process that runs
# TensorFlow is unsafe) and rebuilds the plan with jobs(); a helper whose plan
# differs (names compared) runs nothing. Each process takes the next job index
# from a shared counter; the helpers report progress and outcomes over a queue,
# which a thread of this process turns into the callbacks. A job a helper took
# but never finished (it died) is run here at the end.


class _Serialized:
    """The progress callbacks, one at a time (this thread and the queue reader)."""

    def __init__(self, on_start: Any, on_example: Any, on_outcome: Any) -> None:
        import threading

        self.lock = threading.Lock()
        self.calls = {"start": on_start, "example": on_example, "outcome": on_outcome}

    def __call__(self, kind: str, *args: Any) -> None:
        fn = self.calls[kind]
        if fn is not None:
            with self.lock:
                fn(*args)


class _Helpers:
    """What a helper process needs to rebuild the plan, and the CPU it used."""

    def __init__(
        self,
        frameworks: list[str],
        examples: int,
        seed: int,
        device: str,
        threads: int | None,
        planned: list[Job],
    ) -> None:
        self.args = (frameworks, examples, seed, device, threads)
        self.names = [j.name for j in planned]
        self.cpu_seconds: list[float] = []  # one entry per helper that exited
        self.declined: list[str] = []


def _run_parallel(
    planned: list[Job],
    examples: int,
    seed: int,
    workers: int,
    call: _Serialized,
    helpers: _Helpers,
) -> list[Outcome]:
    import multiprocessing
    import queue as queue_module
    import threading

    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    events = ctx.Queue()
    procs = [
        ctx.Process(
            target=_helper_main,
            args=(*helpers.args, helpers.names, counter, events),
            daemon=True,
        )
        for _ in range(workers - 1)
    ]
    for proc in procs:
        proc.start()
    done: dict[int, Outcome] = {}

    def read() -> None:
        exited = 0
        while exited < len(procs):
            try:
                kind, *rest = events.get(timeout=1.0)
            except queue_module.Empty:
                if not any(p.is_alive() for p in procs) and events.empty():
                    return  # a helper died without saying goodbye
                continue
            if kind == "exit":
                exited += 1
                helpers.cpu_seconds.append(rest[0])
            elif kind == "declined":
                helpers.declined.append(rest[0])
            elif kind == "start":
                call("start", planned[rest[0]], examples)
            elif kind == "example":
                call("example", planned[rest[0]])
            elif kind == "done":
                i, fields = rest
                out = Outcome(planned[i], 0, {}, 0.0)
                for key, value in fields.items():
                    setattr(out, key, value)
                done[i] = out
                call("outcome", out)

    reader = threading.Thread(target=read, name="gradcheck-audit-helpers", daemon=True)
    reader.start()

    def run_here(i: int) -> None:
        call("start", planned[i], examples)
        out = run_job(planned[i], examples, seed + i, lambda job: call("example", job))
        done[i] = out
        call("outcome", out)

    schedule = _schedule(planned)
    while (g := _take(counter, len(schedule))) is not None:
        for i in schedule[g]:
            run_here(i)
    reader.join()
    for proc in procs:
        proc.join(timeout=10)
    for i in range(len(planned)):  # taken by a helper that died: run it here
        if i not in done:
            run_here(i)
    return [done[i] for i in range(len(planned))]


def _shared_worker(job: Job) -> str | None:
    """The process-wide resource ``job`` shares with other jobs, if any: the
    MirroredStrategy worker process (one per audit process, serving both
    MirroredStrategy jobs), the DDP jobs' pair of rank processes, torch.compile's
    in-process caches. Jobs sharing one run back to back in one process: spread
    over two, each process paid the start-up (the MirroredStrategy worker imports
    TensorFlow, seconds of CPU)."""
    if job.device.startswith("MirroredStrategy"):
        return "MirroredStrategy"
    if job.property in ("distributed[ddp]", "variants[compile]"):
        return job.property
    return None


def _expected_seconds(job: Job) -> float:
    """A job's rough relative cost, from the per-job seconds of the audit with
    this ordering's commit on a 2-core AMD EPYC at load average 11-12 (about
    twice the idle seconds): MirroredStrategy 39 and 51 s (waiting on its
    worker), DDP 16 s for the pair, torch.compile 13-22 s, Keras training 13-23
    s, TensorFlow engine jobs 1-27 s (the planted ones longer), cross-framework
    4-9 s, torch engine jobs 0.2-10 s. It only orders the side-by-side run
    (:func:`_schedule`); a wrong guess costs time, never a result."""
    if job.skip is not None:
        return 0.0
    if job.device.startswith("MirroredStrategy"):
        return 15.0
    if job.property == "distributed[ddp]":
        return 12.0
    if job.property == "variants[compile]":
        return 10.0
    if job.property == "keras_training":
        return 6.0
    if job.framework == "tensorflow":
        return 4.0 if job.planted else 2.5
    if job.framework == "torch+tensorflow":
        return 3.0
    return 1.5


def _schedule(planned: list[Job]) -> list[list[int]]:
    """The order the processes take jobs in, as groups of plan indices run back
    to back by one process (:func:`_shared_worker`): the longest first (by
    :func:`_expected_seconds`; plan order among equals), so that no long job
    starts last and runs alone while the other processes have nothing left (at
    4a99c76 the MirroredStrategy planted job, 20 s, was 57th of the 65 and ran
    into the end). A job's outcome does not depend on when or where it runs: it
    is seeded by its plan index."""
    units: list[list[int]] = []
    shared: dict[str, list[int]] = {}
    for i, job in enumerate(planned):
        key = _shared_worker(job) if job.skip is None else None
        if key is None:
            units.append([i])
        elif key in shared:
            shared[key].append(i)
        else:
            shared[key] = [i]
            units.append(shared[key])
    return sorted(units, key=lambda u: -sum(_expected_seconds(planned[i]) for i in u))


def _take(counter: Any, n: int) -> int | None:
    with counter.get_lock():
        i = counter.value
        if i >= n:
            return None
        counter.value = i + 1
        return i


#: what a helper sends back of an Outcome (its Job stays in the parent)
_OUTCOME_FIELDS = (
    "examples",
    "statuses",
    "seconds",
    "cpu_seconds",
    "report",
    "spec",
    "code",
    "error",
    "shrink_steps",
    "example",
)


def _helper_main(
    frameworks: list[str],
    examples: int,
    seed: int,
    device: str,
    threads: int | None,
    names: list[str],
    counter: Any,
    events: Any,
) -> None:
    """A helper process: rebuild the plan, then run jobs until none is left."""
    import multiprocessing
    import os
    import pickle

    cpu = time.process_time()
    try:
        from gradcheck._quiet import import_quietly

        for fw in frameworks:
            import_quietly(fw)
        planned = list(jobs(frameworks, seed, device))
        if [j.name for j in planned] != names:
            events.put(("declined", "the plan differs in a fresh process"))
            return
        parent = multiprocessing.parent_process()

        def example(i: int) -> None:
            if parent is not None and not parent.is_alive():
                os._exit(1)  # the audit is gone (killed): stop, do not linger
            events.put(("example", i))

        schedule = _schedule(planned)
        with _intra_op_threads(frameworks, threads):
            while (g := _take(counter, len(schedule))) is not None:
                for i in schedule[g]:
                    events.put(("start", i))
                    out = run_job(
                        planned[i], examples, seed + i, lambda _job, i=i: example(i)
                    )
                    fields = {k: getattr(out, k) for k in _OUTCOME_FIELDS}
                    try:
                        pickle.dumps(fields)
                    except Exception:  # not sendable: the parent runs job i again
                        continue
                    events.put(("done", i, fields))
    except Exception as exc:  # the parent runs what is left
        events.put(("declined", f"{type(exc).__name__}: {exc}"))
    finally:
        _close_workers()
        events.put(("exit", time.process_time() - cpu))


@contextlib.contextmanager
def _intra_op_threads(frameworks: list[str], n: int | None) -> Iterator[str]:
    """torch's intra-op thread count set to ``n`` for the block, then restored.
    (TensorFlow's cannot change once its runtime is up, and its small ops showed
    no difference: it is left alone.) Yields what was set, for the environment."""
    if n is None or "torch" not in frameworks:
        yield ""
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield f"torch {n} (was {before})"
    finally:
        torch.set_num_threads(before)


def environment(frameworks: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    for name in [*frameworks, "keras"] if "tensorflow" in frameworks else frameworks:
        for dist in DISTRIBUTIONS[name]:  # versions without importing the framework
            try:
                env[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return env


def _device_environment(frameworks: list[str]) -> dict[str, Any]:
    """Devices and TF32 state of the audited frameworks (imported by now), flat."""
    from gradcheck.devices import environment as device_environment

    try:
        info = device_environment(frameworks).get("frameworks", {})
    except gradcheck.GradcheckError as exc:  # a framework that cannot list devices
        return {"devices": f"unknown ({exc})"}
    env: dict[str, Any] = {}
    for fw, facts in info.items():
        env[f"{fw} devices"] = ", ".join(facts.get("devices") or []) or "none"
        tf32 = facts.get("tf32") or {}
        env[f"{fw} TF32"] = (
            "; ".join(
                f"{dev}: {'in play' if st.get('in_play') else 'not in play'}"
                + (f" ({st['reason']})" if st.get("reason") else "")
                for dev, st in tf32.items()
            )
            or "unknown"
        )
    return env


#: the planner helpers rebuild the plan with (a replaced ``jobs``, as in tests,
#: cannot be rebuilt in a fresh process: such a plan runs here, one job at a time)
_PLANNER = jobs
