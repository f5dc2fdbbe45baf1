"""Model zoo: gradcheck's verdicts on real torch architectures (transformers).

For each model of tests/zoo.py (BERT, GPT-2, ResNet, MobileNetV2, ConvNeXt, ViT; built
from configs with random weights, shrunk, eval mode, two heads with weights 1.0 / 0.3)
and each dtype (float32, float64), run

- ``check_gradients(total, params=net)``: finite differences (expected: passed, or
  nondifferentiable where a kink is real);
- ``check_linearity(total, losses, weights, params=net)`` (expected: passed);
- ``check_gradients`` with a planted backward off by 1e-3 on one feed-forward block
  of the first block (expected: mismatch);

check that the model's state (parameters, buffers, .grad, requires_grad, train/eval
flags) is bit-identical afterwards, and print a markdown table: model, parameters,
each property x dtype verdict, seconds. The messages of every check that did not
give the expected verdict follow the table.

Usage::

    PYTHONPATH=. python benchmarks/zoo.py                       # every model
    PYTHONPATH=. python benchmarks/zoo.py --models bert,vit --out reports/zoo.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import gradcheck
from tests import zoo

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROPERTIES = ("gradients", "linearity", "planted bug")


@dataclass
class Cell:
    status: str
    expected: tuple[str, ...]
    seconds: float
    message: str

    @property
    def ok(self) -> bool:
        return self.status in self.expected


@dataclass
class Row:
    model: str
    params: int
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    state_ok: bool = True
    seconds: float = 0.0


def _planted(case: zoo.ZooCase) -> gradcheck.CheckReport:
    with zoo.plant_bug(case):
        return gradcheck.check_gradients(case.total, params=case.net)


def run_model(name: str, dtypes: list[str]) -> Row:
    row = Row(model=name, params=0)
    t_model = time.perf_counter()
    for dname in dtypes:
        case = zoo.build(name, DTYPES[dname])
        row.params = case.n_params
        before = zoo.snapshot(case.net)
        checks = {
            "gradients": (
                zoo.EXPECTED_FD.get(name, ("passed",)),
                functools.partial(
                    gradcheck.check_gradients, case.total, params=case.net
                ),
            ),
            "linearity": (
                ("passed",),
                functools.partial(
                    gradcheck.check_linearity,
                    case.total,
                    case.losses(),
                    zoo.WEIGHTS,
                    params=case.net,
                ),
            ),
            "planted bug": (("mismatch",), functools.partial(_planted, case)),
        }
        for prop, (expected, check) in checks.items():
            t0 = time.perf_counter()
            report = check()
            seconds = time.perf_counter() - t0
            row.cells[(prop, dname)] = Cell(
                report.status, expected, seconds, report.message()
            )
        try:
            zoo.assert_same_state(before, case.net)
        except AssertionError as exc:
            row.state_ok = False
            print(f"{name} {dname}: state changed: {exc}", file=sys.stderr)
    row.seconds = time.perf_counter() - t_model
    return row


def table(rows: list[Row], dtypes: list[str]) -> str:
    cols = [(p, d) for p in PROPERTIES for d in dtypes]
    head = ["model", "parameters"] + [f"{p} {d}" for p, d in cols]
    head += ["state untouched", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = []
        for key in cols:
            c = r.cells.get(key)
            if c is None:
                cells.append("-")
            else:
                mark = "" if c.ok else " ✗"
                cells.append(f"{c.status}{mark} ({c.seconds:.1f} s)")
        lines.append(
            "| "
            + " | ".join(
                [r.model, f"{r.params:,}", *cells]
                + ["yes" if r.state_ok else "**no**", f"{r.seconds:.1f}"]
            )
            + " |"
        )
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    out = []
    for r in rows:
        for (prop, dname), c in r.cells.items():
            if not c.ok:
                want = " or ".join(c.expected)
                out.append(
                    f"### {r.model}, {prop}, {dname}: {c.status} (expected {want})\n\n"
                    f"```\n{c.message}\n```\n"
                )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(zoo.ZOO))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [m for m in models if m not in zoo.ZOO]
    unknown += [d for d in dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}")

    rows = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    for name in models:
        rows.append(run_model(name, dtypes))
        print(f"{name}: {rows[-1].seconds:.1f} s", file=sys.stderr)
    total = time.perf_counter() - t0

    import transformers

    bad = sum(not c.ok for r in rows for c in r.cells.values())
    bad += sum(not r.state_ok for r in rows)
    text = "\n".join(
        [
            "# Model zoo",
            "",
            f"`PYTHONPATH=. python benchmarks/zoo.py` on {platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
            f"{total:.0f} s in all (load average {load:.1f} at the start: seconds are "
            "wall-clock and grow with other work on the machine).",
            "",
            "Random weights from configs (tests/zoo.py), eval mode, heads `main` "
            "(Linear + MSE, weight 1.0) and `aux` (random projection, squared norm, "
            "weight 0.3). *planted bug*: a backward 1e-3 too large on one feed-forward "
            "block of the first block; expected `mismatch`. ✗ marks a verdict other "
            "than the expected one.",
            "",
            table(rows, dtypes),
            "",
            f"{bad} unexpected verdict(s).",
            "",
            details(rows),
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text.rstrip() + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
