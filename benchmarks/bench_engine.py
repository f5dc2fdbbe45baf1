"""Cost of a gradient check relative to training, and relative to torch's gradcheck.

One run reports, on this machine's CPU:

* ratio A: ``gradcheck.check_gradients(total, params=model)`` in float32 divided by
  one float32 training step (zero_grad + forward + backward + SGD step);
* ratio B: ``gradcheck.check_gradients`` in float64 divided by
  ``torch.autograd.gradcheck(..., fast_mode=True)`` on the same function of the
  same float64 parameters (passed as positional inputs through
  ``torch.func.functional_call``);
* float64 check / float64 training step, and what every check did;
* the floor of a float32 check: the work no float32 check against a float64
  reference can skip, in plain torch (one float32 forward + backward at the point,
  two float64 forwards of a float64 copy of the model), beside the check and the
  step as check / floor and floor / step. ``--floor`` adds that table for the
  bench's model and its tanh twin (issue 12: is check / step <= 3 reachable?).

Every timing is the median of ``--repeats`` calls after one warm-up call. The script
reports numbers; it asserts nothing about them. Usage::

    PYTHONPATH=. python benchmarks/bench_engine.py [--quick] [--repeats N] [--json P]
        [--floor] [--scaling]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import gradcheck

#: Goals the ratios are read against (reported, never asserted).
GOAL_A = 3.0
GOAL_B = 1.0
#: torch.autograd.gradcheck's defaults, spelled out so the report can show them.
TORCH_EPS, TORCH_ATOL, TORCH_RTOL = 1e-6, 1e-5, 1e-3
AUX_WEIGHT = 0.5
SEED = 0
LR = 1e-3
OPTIMIZER = f"torch.optim.SGD(lr={LR:g})"
SIZES = {  # (n_in, hidden, trunk_out, batch)
    "full": (512, 1024, 512, 64),  # 1,055,755 parameters
    "quick": (32, 64, 32, 8),
    "10M": (1280, 4096, 1280, 64),  # 10,498,571 parameters
}
N_CLASSES = 10


class TwoHeadMLP(torch.nn.Module):
    """Trunk Linear-act-Linear-act (act ReLU, or tanh for the twin); a regression
    head and a 10-class head."""

    def __init__(self, n_in: int, hidden: int, trunk_out: int, act: str = "relu"):
        super().__init__()
        make = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[act]
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(n_in, hidden),
            make(),
            torch.nn.Linear(hidden, trunk_out),
            make(),
        )
        self.main = torch.nn.Linear(trunk_out, 1)
        self.aux = torch.nn.Linear(trunk_out, N_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.main(h), self.aux(h)


def build_model(
    quick: bool, act: str = "relu", size: str | None = None
) -> tuple[TwoHeadMLP, dict[str, torch.Tensor]]:
    """The seeded float32 model and its batch (x, regression and class targets)."""
    n_in, hidden, trunk_out, batch = SIZES[size or ("quick" if quick else "full")]
    torch.manual_seed(SEED)
    model = TwoHeadMLP(n_in, hidden, trunk_out, act)
    g = torch.Generator().manual_seed(SEED + 1)
    data = {
        "x": torch.randn(batch, n_in, generator=g),
        "y_main": torch.randn(batch, 1, generator=g),
        "y_aux": torch.randint(0, N_CLASSES, (batch,), generator=g),
    }
    return model, data


def total_loss(outputs: tuple[torch.Tensor, torch.Tensor], data: dict) -> torch.Tensor:
    main, aux = outputs
    return F.mse_loss(main, data["y_main"]) + AUX_WEIGHT * F.cross_entropy(
        aux, data["y_aux"]
    )


def as_dtype(model: torch.nn.Module, data: dict, dtype: torch.dtype):
    """A copy of the model and the floating data in ``dtype`` (targets kept as-is)."""
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}
    return copy.deepcopy(model).to(dtype), cast


def time_call(
    fn: Callable[[], Any], repeats: int
) -> tuple[float, list[float], Any, float]:
    """One warm-up call, then ``repeats`` timed calls: (median s, samples, last,
    median CPU s of this process). Garbage is collected before each call, outside
    the timed region. The CPU time (time.process_time, every thread of the
    process) moves less than the wall clock when other processes share the cores."""
    result = fn()
    samples, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        samples.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(samples), samples, result, statistics.median(cpu)


def train_step_fn(model: torch.nn.Module, data: dict) -> Callable[[], None]:
    """One training step on a private copy (the checked model is left untouched)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad()
        total_loss(model(data["x"]), data).backward()
        opt.step()

    return step


def check_fn(model: torch.nn.Module, data: dict) -> Callable[[], Any]:
    """gradcheck on the model's parameters, as a user would call it."""
    return lambda: gradcheck.check_gradients(
        lambda: total_loss(model(data["x"]), data), params=model
    )


def floor_fn(
    model: torch.nn.Module, data: dict, parts: list[tuple[float, float]] | None = None
) -> Callable[[], None]:
    """The irreducible work of a float32 check with a float64 reference, in plain
    torch (no gradcheck): one float32 forward + backward at the point (the
    gradient to check, as torch.autograd.grad of the loss with respect to the
    parameters) and two float64 forwards, at x + h d and x - h d, of a float64
    copy of the model on the same batch (a central difference). The float64
    copy is made once, outside the timed calls, as gradcheck reuses its own
    float64 shadows; forming x +- h d is not counted. With ``parts``, each call
    appends its two parts' seconds to it: (forward + backward, the forwards)."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    model64, data64 = as_dtype(model, data, torch.float64)

    def floor() -> None:
        start = time.perf_counter()
        torch.autograd.grad(total_loss(model(data["x"]), data), params)
        middle = time.perf_counter()
        with torch.no_grad():
            for _ in range(2):
                total_loss(model64(data64["x"]), data64)
        if parts is not None:
            parts.append((middle - start, time.perf_counter() - middle))

    return floor


def functional(model: torch.nn.Module, data: dict):
    """The loss as a function of the parameters passed positionally, the parameters
    (float64 leaves that require grad) and a call counter."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(
        p.detach().clone().requires_grad_(True) for _, p in model.named_parameters()
    )
    calls = {"n": 0}

    def loss(*ps: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        outs = torch.func.functional_call(
            model, dict(zip(names, ps, strict=True)), (data["x"],)
        )
        return total_loss(outs, data)

    return loss, params, calls


def torch_gradcheck_fn(loss, params, calls) -> Callable[[], dict]:
    def call() -> dict:
        calls["n"] = 0
        ok = torch.autograd.gradcheck(
            loss,
            params,
            eps=TORCH_EPS,
            atol=TORCH_ATOL,
            rtol=TORCH_RTOL,
            fast_mode=True,
            raise_exception=False,
        )
        return {"passed": bool(ok), "fn_calls": calls["n"]}

    return call


def describe(report: Any) -> dict:
    return {
        "status": report.status,
        "mode": report.mode,
        "reference_dtype": report.reference_dtype,
        "forward": int(report.cost.get("forward", 0)),
        "backward": int(report.cost.get("backward", 0)),
        "error": report.error,
        "tolerance": report.tolerance,
        "message": report.message(),
    }


def timing(median: float, samples: list[float]) -> dict:
    return {"median_s": median, "samples_s": samples}


def run(quick: bool = False, repeats: int = 7) -> dict:
    """Build the model, time everything, return the numbers (JSON-serialisable)."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model32, data32 = build_model(quick)
    model64, data64 = as_dtype(model32, data32, torch.float64)
    loss64, params64, calls = functional(model64, data64)

    t = {}
    t["train32"] = time_call(train_step_fn(model32, data32), repeats)
    t["train64"] = time_call(train_step_fn(model64, data64), repeats)
    t["check32"] = time_call(check_fn(model32, data32), repeats)
    t["floor32"] = time_call(floor_fn(model32, data32), repeats)
    t["check64"] = time_call(check_fn(model64, data64), repeats)
    t["check64_fn"] = time_call(
        lambda: gradcheck.check_gradients(loss64, params64), repeats
    )
    t["torch64"] = time_call(torch_gradcheck_fn(loss64, params64, calls), repeats)
    med = {k: v[0] for k, v in t.items()}
    cpu = {k: v[3] for k, v in t.items()}
    n_in, hidden, trunk_out, batch = SIZES["quick" if quick else "full"]
    return {
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "model": {
            "layers": f"{n_in}->{hidden}->{trunk_out}, heads {trunk_out}->1 (MSE), "
            f"{trunk_out}->{N_CLASSES} (CE); loss = main + {AUX_WEIGHT:g}*aux",
            "parameters": sum(p.numel() for p in model32.parameters()),
            "batch": batch,
            "seed": SEED,
            "quick": quick,
        },
        "method": {
            "repeats": repeats,
            "warmup": 1,
            "statistic": "median",
            "clock": "time.perf_counter",
            "optimizer": OPTIMIZER,
            "train_step": "zero_grad + forward + backward + optimizer.step()",
            "floor": "float32 forward + backward, 2 float64 forwards (plain torch)",
            "torch_gradcheck": {
                "fast_mode": True,
                "eps": TORCH_EPS,
                "atol": TORCH_ATOL,
                "rtol": TORCH_RTOL,
            },
        },
        "timings": {
            k: {**timing(v[0], v[1]), "cpu_median_s": v[3]} for k, v in t.items()
        },
        "ratios": {
            "A_check32_over_train32": med["check32"] / med["train32"],
            "check32_over_floor32": med["check32"] / med["floor32"],
            "floor32_over_train32": med["floor32"] / med["train32"],
            "B_check64_over_torch_gradcheck64": med["check64_fn"] / med["torch64"],
            "check64_over_train64": med["check64"] / med["train64"],
            "check64_params_over_torch_gradcheck64": med["check64"] / med["torch64"],
            "A_cpu": cpu["check32"] / cpu["train32"],
            "B_cpu": cpu["check64_fn"] / cpu["torch64"],
        },
        "load_average": os.getloadavg(),
        "goals": {
            "A_check32_over_train32": GOAL_A,
            "B_check64_over_torch_gradcheck64": GOAL_B,
        },
        "checks": {
            "check32": describe(t["check32"][2]),
            "check64": describe(t["check64"][2]),
            "check64_fn": describe(t["check64_fn"][2]),
        },
        "torch_gradcheck": t["torch64"][2],
    }


# ------------------------------------------------------------------------ scaling
SCALING = (  # (size, activation): the bench's model, its tanh twin, 10x the size
    ("full", "relu"),
    ("full", "tanh"),
    ("10M", "relu"),
    ("10M", "tanh"),
)


def scaling(repeats: int, keras: bool = True) -> list[dict]:
    """Check time against parameters and against a training step, float32 and
    float64, for the MLP family and (when TensorFlow is installed) a Keras CNN:
    keras.applications.MobileNetV3Small at 32x32, batch 6, the issue's case."""
    rows = []
    for size, act in SCALING:
        model32, data32 = build_model(False, act=act, size=size)
        n = sum(p.numel() for p in model32.parameters())
        for dtype in (torch.float32, torch.float64):
            model, data = (
                (model32, data32)
                if dtype == torch.float32
                else as_dtype(model32, data32, dtype)
            )
            step = time_call(train_step_fn(model, data), repeats)
            check = time_call(check_fn(model, data), repeats)
            rows.append(
                {
                    "model": f"MLP {act}",
                    "parameters": n,
                    "dtype": str(dtype).removeprefix("torch."),
                    "check_s": check[0],
                    "step_s": step[0],
                    "ratio": check[0] / step[0],
                    "cpu_ratio": check[3] / step[3],
                    "status": check[2].status,
                }
            )
            del model, data
            gc.collect()
    if keras:
        rows.extend(_keras_rows(repeats))
    return rows


FLOOR_MODELS = ("relu", "tanh")  # the bench's model and its tanh twin


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, tuple[float, list[float], Any, float]]:
    """time_call for several functions, called in turn in each round (one warm-up
    round first), so that a change in the machine's load reaches all of them
    alike: {name: (median s, samples, last result, median CPU s)}."""
    results = {k: fn() for k, fn in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            results[k] = fn()
            samples[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - start_cpu)
    return {
        k: (
            statistics.median(samples[k]),
            samples[k],
            results[k],
            statistics.median(cpu[k]),
        )
        for k in fns
    }


def floor_table(repeats: int, quick: bool = False) -> list[dict]:
    """The float32 check of the bench's model and of its tanh twin beside one
    training step and the check's floor (floor_fn), timed in turn in one
    process: check / step, check / floor and floor / step."""
    rows = []
    for act in FLOOR_MODELS:
        model, data = build_model(quick, act=act)
        check, costs = recorded(check_fn(model, data))
        floor_parts: list[tuple[float, float]] = []
        t = time_interleaved(
            {
                "step": train_step_fn(model, data),
                "floor": floor_fn(model, data, floor_parts),
                "check": check,
            },
            repeats,
        )
        med = {k: v[0] for k, v in t.items()}
        parts = check_parts(costs[1:])  # the timed calls, not the warm-up
        if floor_parts[1:]:
            parts["floor_gradient"] = statistics.median(p[0] for p in floor_parts[1:])
            parts["floor_reference"] = statistics.median(p[1] for p in floor_parts[1:])
        rows.append(
            {
                "model": f"MLP {act}",
                "parameters": sum(p.numel() for p in model.parameters()),
                "check_s": med["check"],
                "step_s": med["step"],
                "floor_s": med["floor"],
                "check_over_step": med["check"] / med["step"],
                "check_over_floor": med["check"] / med["floor"],
                "floor_over_step": med["floor"] / med["step"],
                "check_parts_s": parts,
                "samples_s": {k: v[1] for k, v in t.items()},
                "status": t["check"][2].status,
                "load_average": os.getloadavg(),
            }
        )
    return rows


def recorded(check: Callable[[], Any]) -> tuple[Callable[[], Any], list[dict]]:
    """``check`` and the list its calls append their report's cost to."""
    costs: list[dict] = []

    def call() -> Any:
        report = check()
        costs.append(dict(report.cost))
        return report

    return call, costs


def check_parts(costs: list[dict]) -> dict[str, float]:
    """Where the checks' time went, from their reports (median of each part over
    the calls): the framework's forward and backward at x (the gradient judged,
    ``cost["gradient_seconds"]``), fn's finite-difference evaluations with x + t d
    formed (``cost["reference_seconds"]``), and the rest of the check's own
    ``cost["seconds"]``: gradcheck's own work (session, direction, reductions,
    tolerance)."""
    if not costs:
        return {}
    return {
        "gradient": statistics.median(c["gradient_seconds"] for c in costs),
        "reference": statistics.median(c["reference_seconds"] for c in costs),
        "own": statistics.median(
            c["seconds"] - c["gradient_seconds"] - c["reference_seconds"] for c in costs
        ),
    }


def print_floor(rows: list[dict]) -> None:
    print(
        f"\n{'float32':<10} {'params':>10} {'check ms':>9} {'step ms':>8} "
        f"{'floor ms':>9} {'check/step':>10} {'check/floor':>11} "
        f"{'floor/step':>10}  status"
    )
    for r in rows:
        print(
            f"{r['model']:<10} {r['parameters']:>10,} {r['check_s'] * 1e3:>9.2f} "
            f"{r['step_s'] * 1e3:>8.2f} {r['floor_s'] * 1e3:>9.2f} "
            f"{r['check_over_step']:>10.2f} {r['check_over_floor']:>11.2f} "
            f"{r['floor_over_step']:>10.2f}  {r['status']}"
        )
    print(
        "floor = float32 forward+backward + 2 float64 forwards (plain torch); "
        f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()}"
    )
    print(
        f"\n{'check ms':<10} {'gradient':>9} {'(floor)':>8} {'reference':>10} "
        f"{'(floor)':>8} {'own':>7}   (medians over the timed calls)"
    )
    for r in rows:
        p = r["check_parts_s"]
        if p:
            print(
                f"{r['model']:<10} {p['gradient'] * 1e3:>9.2f} "
                f"{p.get('floor_gradient', math.nan) * 1e3:>8.2f} "
                f"{p['reference'] * 1e3:>10.2f} "
                f"{p.get('floor_reference', math.nan) * 1e3:>8.2f} "
                f"{p['own'] * 1e3:>7.2f}"
            )
    print(
        "from each report's cost: gradient = the framework's float32 forward + "
        "backward at x, with gradcheck's calls around them (floor: "
        "torch.autograd.grad); reference = forming x +- h d and fn's float64 "
        "forwards there (floor: the 2 forwards of a float64 copy); own = the rest "
        "of the check: gradcheck's session, direction, reductions and tolerance"
    )


def _keras_rows(repeats: int) -> list[dict]:
    try:
        import keras
        import tensorflow as tf
    except ImportError:
        return []
    keras.utils.set_random_seed(SEED)
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=10
    )
    rng = np.random.default_rng(SEED)
    x = tf.constant(rng.standard_normal((6, 32, 32, 3)), tf.float32)
    y = tf.constant(rng.integers(0, 10, 6))
    loss = keras.losses.SparseCategoricalCrossentropy()
    opt = keras.optimizers.SGD(LR)

    def step() -> None:
        # the user's eager step: one forward, one backward, one update (the steps
        # move the weights: they are put back with set_weights before the check)
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    weights = model.get_weights()
    step_t = time_call(step, repeats)
    model.set_weights(weights)
    check = time_call(
        lambda: gradcheck.check_gradients(
            lambda: loss(y, model(x, training=False)), params=model
        ),
        max(1, min(repeats, 3)),
    )
    return [
        {
            "model": "keras MobileNetV3Small 32x32, batch 6",
            "parameters": int(model.count_params()),
            "dtype": "float32",
            "check_s": check[0],
            "step_s": step_t[0],
            "ratio": check[0] / step_t[0],
            "cpu_ratio": check[3] / step_t[3],
            "status": check[2].status,
        }
    ]


def print_scaling(rows: list[dict]) -> None:
    print(
        f"\n{'model':<40} {'params':>11} {'dtype':<8} {'check s':>9} "
        f"{'step s':>9} {'check/step':>10} {'cpu ratio':>9}  status"
    )
    for r in rows:
        print(
            f"{r['model']:<40} {r['parameters']:>11,} {r['dtype']:<8} "
            f"{r['check_s']:>9.3f} {r['step_s']:>9.4f} {r['ratio']:>10.1f} "
            f"{r['cpu_ratio']:>9.1f}  {r['status']}"
        )
    print(f"load average after the table: {os.getloadavg()}")


# ------------------------------------------------------------------------- output
ROWS = [  # (timing key, label)
    ("train32", "float32 training step"),
    ("check32", "gradcheck float32, params=model"),
    ("floor32", "floor of a float32 check (plain torch)"),
    ("train64", "float64 training step"),
    ("check64", "gradcheck float64, params=model"),
    ("check64_fn", "gradcheck float64, functional_call"),
    ("torch64", "torch.autograd.gradcheck fast_mode, functional_call"),
]
RATIO_LABELS = {
    "A_check32_over_train32": "A: check f32 / train step f32",
    "check32_over_floor32": "check f32 / its floor (f32 fwd+bwd, 2 f64 fwd)",
    "floor32_over_train32": "floor f32 / train step f32 (A's lower bound)",
    "B_check64_over_torch_gradcheck64": "B: check f64 / torch gradcheck f64 (same fn)",
    "check64_over_train64": "check f64 / train step f64",
    "check64_params_over_torch_gradcheck64": "check f64 (params=model) / torch gc f64",
    "A_cpu": "A in CPU time (process_time)",
    "B_cpu": "B in CPU time (process_time)",
}


def _what(res: dict, key: str) -> str:
    if key.startswith("train"):
        return OPTIMIZER
    if key == "floor32":
        return "torch.autograd.grad in float32, 2 no_grad forwards in float64"
    if key == "torch64":
        verdict = "passed" if res["torch_gradcheck"]["passed"] else "FAILED"
        return f"{verdict}; {res['torch_gradcheck']['fn_calls']} fn calls"
    c = res["checks"][key]
    return (
        f"{c['status']}; {c['forward']} fwd / {c['backward']} bwd, {c['mode']}, "
        f"ref {c['reference_dtype']}"
    )


def _header(res: dict) -> list[str]:
    env, m = res["env"], res["model"]
    return [
        f"torch {env['torch']}, python {env['python']}, {env['machine']}, "
        f"cpu_count {env['cpu_count']}, torch.set_num_threads({env['torch_threads']})",
        f"model {m['layers']}; {m['parameters']:,} parameters, batch {m['batch']}, "
        f"seed {m['seed']}{' (quick)' if m['quick'] else ''}",
        f"median of {res['method']['repeats']} after 1 warm-up, time.perf_counter; "
        f"train step = {res['method']['train_step']} with {OPTIMIZER}",
        "load average (1, 5, 15 min) at the end: "
        + ", ".join(f"{v:.2f}" for v in res["load_average"]),
    ]


def _ratio_rows(res: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key, label in RATIO_LABELS.items():
        goal = res["goals"].get(key)
        value = res["ratios"][key]
        verdict = "" if goal is None else ("met" if value <= goal else "NOT met")
        rows.append((label, f"{value:.2f}", f"<= {goal:g} {verdict}" if goal else ""))
    return rows


def _failures(res: dict) -> list[str]:
    out = [c["message"] for c in res["checks"].values() if c["status"] != "passed"]
    if not res["torch_gradcheck"]["passed"]:
        out.append("torch.autograd.gradcheck(fast_mode=True) returned False")
    return out


def print_rich(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: do not wrap the table at 80 columns
        console = Console(width=130)
    for line in _header(res):
        console.print(line, highlight=False, soft_wrap=True)
    table = Table(title="Timings (median)")
    for col, just in (("what", "left"), ("ms", "right"), ("result", "left")):
        table.add_column(col, justify=just)
    for key, label in ROWS:
        ms = res["timings"][key]["median_s"] * 1e3
        table.add_row(label, f"{ms:.2f}", _what(res, key))
    console.print(table)
    ratios = Table(title="Ratios")
    for col, just in (("ratio", "left"), ("value", "right"), ("goal", "left")):
        ratios.add_column(col, justify=just)
    for row in _ratio_rows(res):
        ratios.add_row(*row)
    console.print(ratios)
    for msg in _failures(res):
        console.print(msg, highlight=False, markup=False)


def print_plain(res: dict) -> None:
    print("\n".join(_header(res)))
    print(f"\n{'what':<54} {'ms':>10}  result")
    for key, label in ROWS:
        ms = res["timings"][key]["median_s"] * 1e3
        print(f"{label:<54} {ms:>10.2f}  {_what(res, key)}")
    print(f"\n{'ratio':<54} {'value':>10}  goal")
    for label, value, goal in _ratio_rows(res):
        print(f"{label:<54} {value:>10}  {goal}")
    for msg in _failures(res):
        print(msg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (2)")
    parser.add_argument("--json", default="reports/bench.json", help="output path")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also the scaling table: MLP relu/tanh at 1M and 10M parameters, "
        "float32 and float64, and a Keras MobileNetV3Small (issue 12)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="only the float32 floor table: check, training step and the check's "
        "floor (float32 forward+backward, 2 float64 forwards) for the bench's MLP "
        "and its tanh twin, timed in turn",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    if args.floor:
        threads = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        )
        torch.set_num_threads(threads or os.cpu_count() or 1)
        rows = floor_table(max(1, repeats), quick=args.quick)
        print_floor(rows)
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"floor": rows}, indent=2) + "\n")
        print(f"wrote {path}")
        return
    res = run(quick=args.quick, repeats=max(1, repeats))
    if args.scaling:
        res["scaling"] = scaling(max(1, min(repeats, 3)))
    try:
        print_rich(res)
    except ImportError:
        print_plain(res)
    if "scaling" in res:
        print_scaling(res["scaling"])
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
