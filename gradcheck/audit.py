"""The audit: does this machine's framework stack compute the gradients that
total = sum_i w_i * loss_i implies, and does gradcheck see it?

Every case is a seeded multi-head model (a trunk, a main head and an auxiliary
head with its own loss weight) checked with the engine, paired with a planted bug
that must be caught. A case passes when its verdict is the expected one: "passed"
for correct code, anything but "passed" for planted bugs. Frameworks are imported
only here, and only those installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gradcheck
from gradcheck.result import CheckReport

FRAMEWORKS = ("torch", "tensorflow")
DISTRIBUTIONS = {"torch": ("torch",), "tensorflow": ("tensorflow", "tensorflow-cpu")}
#: what a planted bug's relative size is, per dtype: the promised detection limits
PLANTED = {"float64": 1e-5, "float32": 1e-3}


@dataclass
class Case:
    name: str
    framework: str
    dtype: str
    property: str
    expect_pass: bool
    run: Callable[[], CheckReport]


@dataclass
class Outcome:
    case: Case
    report: CheckReport | None
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.report is None:
            return False
        return self.report.passed == self.case.expect_pass

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.case.name,
            "framework": self.case.framework,
            "dtype": self.case.dtype,
            "property": self.case.property,
            "expected": "passed" if self.case.expect_pass else "caught",
            "ok": self.ok,
            "seconds": self.seconds,
            "error": self.error,
            "report": None if self.report is None else self.report.to_dict(),
        }


@dataclass
class AuditResult:
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and all(o.ok for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gradcheck_version": gradcheck.__version__,
            "environment": self.environment,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "summary": {
                "cases": len(self.outcomes),
                "ok": sum(o.ok for o in self.outcomes),
                "failed": [o.case.name for o in self.outcomes if not o.ok],
                "all_ok": self.ok,
            },
            "cases": [o.to_dict() for o in self.outcomes],
        }


def available(framework: str) -> bool:
    return importlib.util.find_spec(framework) is not None


#: smooth activations: a correct model must pass outright; ReLU models may be
#: called nondifferentiable now and then (kinks), measured by benchmarks/false_alarms.py
ACTIVATIONS = ("tanh", "gelu", "softplus")


#: losses(planted=..., detach=...) -> {"main": loss, "aux": loss}: the model's
#: per-head losses, with the planted backward bug and/or the aux branch detached
Losses = Callable[..., dict[str, Any]]


def cases(
    framework: str, examples: int, seed: int, activations: tuple[str, ...] = ACTIVATIONS
) -> Iterator[Case]:
    if framework == "torch":
        from gradcheck import _audit_torch as mod
    else:
        from gradcheck import _audit_tensorflow as mod
    rng = np.random.default_rng(seed)
    for i in range(examples):
        for dtype in ("float64", "float32"):
            s = int(rng.integers(2**31))
            params, losses, weights = mod.build(dtype, s, PLANTED[dtype], activations)
            tag = f"{framework}/{dtype}/model{i}"
            yield from model_cases(tag, framework, dtype, s, params, losses, weights)


def model_cases(
    tag: str,
    framework: str,
    dtype: str,
    seed: int,
    params: Any,
    losses: Losses,
    w: dict[str, float],
) -> Iterator[Case]:
    """The four cases of one model: finite differences and linearity, each on the
    correct total and on a planted bug (a scaled backward; a detached aux branch)."""

    def total(**kw: bool) -> Callable[[], Any]:
        return lambda: sum(w[k] * v for k, v in losses(**kw).items())

    fns = {k: (lambda k=k: losses()[k]) for k in w}
    w_detect = dict(w, aux=w["aux"] or 0.3)  # a detached branch needs a weight to miss

    def detached() -> Any:
        return losses()["main"] + w_detect["aux"] * losses(detach=True)["aux"]

    def fd(fn: Callable[[], Any]) -> Callable[[], CheckReport]:
        return lambda: gradcheck.check_gradients(
            fn, params=params, seed=seed, label=tag
        )

    def lin(
        fn: Callable[[], Any], weights: dict[str, float]
    ) -> Callable[[], CheckReport]:
        return lambda: gradcheck.check_linearity(
            fn, fns, weights, params=params, seed=seed, label=tag
        )

    rel = PLANTED[dtype]
    for name, prop, expect, run in (
        ("finite_difference", "finite_difference", True, fd(total())),
        (
            f"finite_difference/planted_scaled_backward_{rel:g}",
            "finite_difference",
            False,
            fd(total(planted=True)),
        ),
        ("linearity", "linearity", True, lin(total(), w)),
        (
            "linearity/planted_detached_aux_branch",
            "linearity",
            False,
            lin(detached, w_detect),
        ),
    ):
        yield Case(f"{tag}/{name}", framework, dtype, prop, expect, run)


def run(
    frameworks: list[str],
    examples: int,
    seed: int,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> AuditResult:
    result = AuditResult(environment=environment(frameworks))
    started = time.perf_counter()
    for fw in frameworks:
        if not available(fw):
            result.skipped[fw] = (
                f"{fw} is not installed (pip install 'gradcheck[{fw}]')"
            )
            continue
        for case in cases(fw, examples, seed):
            t0 = time.perf_counter()
            try:
                out = Outcome(case, case.run(), time.perf_counter() - t0)
            except gradcheck.GradcheckError as exc:
                out = Outcome(
                    case, None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
                )
            result.outcomes.append(out)
            if on_outcome is not None:
                on_outcome(out)
    result.seconds = time.perf_counter() - started
    return result


def environment(frameworks: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    for fw in frameworks:
        for dist in DISTRIBUTIONS[fw]:  # versions without importing the framework
            try:
                env[fw] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return env
