"""The ``hf:*`` sweep as a report: `gradcheck check-model` rows -> reports/models.md.

One row per architecture (transformers model type): the status of each property
(fd, linearity, locality) in each dtype, the seconds of its checks, its
parameters; totals per dtype and status; then every check that did not pass, with
its message (the explanation the sweep's goal asks for). The command, the machine
(``lscpu``'s model name), the load and the wall time are at the top.

Usage::

    # run the sweep (timed) and write reports/models.{json,html,md}; --jobs 2:
    # two processes (one thread each on 2 cores), each on every other type
    PYTHONPATH=. python benchmarks/model_sweep.py --run --jobs 2

    # or render rows from a run made by hand: the --json file, or, for a run
    # stopped before it wrote its JSON, its printed lines (--lines)
    PYTHONPATH=. python benchmarks/model_sweep.py --json reports/models.json \\
        --wall-seconds 3600 --command "gradcheck check-model 'hf:*' ..."
    PYTHONPATH=. python benchmarks/model_sweep.py --lines out.txt --partial \\
        "stopped at the deadline"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROPERTIES = ("fd", "linearity", "locality")
DTYPES = ("float32", "float64")
STATUSES = (
    "passed",
    "nondifferentiable",
    "mismatch",
    "nondeterministic",
    "error",
    "timeout",
    "unbuildable",
)
COMMAND = [
    "gradcheck",
    "check-model",
    "hf:*",
    "--dtype",
    "float32,float64",
    "--timeout",
    "90",
    "--report",
    "reports/",
    "--json",
    "reports/models.json",
]
#: the message of a type transformers itself cannot build or run from its
#: default config (gradcheck.backends._hf says so before blaming its shrink)
TRANSFORMERS_OWN = "from its default config either"
#: a mismatch whose message confirms its cause (finite_difference's detach
#: counterfactual: the model's .detach() calls are the whole mismatch)
CONFIRMED = "cause confirmed"

#: a line `gradcheck check-model` prints per check
LINE = re.compile(
    r"^(?P<status>[a-z]+)\s+(?P<model>\S+) (?P<property>fd|linearity|locality) "
    r"(?P<dtype>float32|float64)  (?P<seconds>[\d.]+) s  (?P<parameters>[\d,]+) "
    r"params  (?P<message>.*?)(?:  \[\d+/\d+\])?$"
)


def parse_lines(text: str) -> list[dict[str, Any]]:
    """The rows of `gradcheck check-model`'s printed lines (first message line
    only): what a run stopped before writing its --json file leaves."""
    rows = []
    for line in text.splitlines():
        m = LINE.match(line.rstrip())
        if m is None or m["status"] not in STATUSES:
            continue
        rows.append(
            {
                "model": m["model"],
                "property": m["property"],
                "dtype": m["dtype"],
                "status": m["status"],
                "seconds": float(m["seconds"]),
                "parameters": int(m["parameters"].replace(",", "")),
                "message": m["message"],
            }
        )
    return rows


def by_model(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = models.setdefault(
            r["model"], {"cells": {}, "seconds": 0.0, "parameters": 0}
        )
        m["cells"][(r["property"], r["dtype"])] = r
        m["seconds"] += float(r["seconds"])
        m["parameters"] = max(m["parameters"], int(r["parameters"]))
    return models


def totals(rows: list[dict[str, Any]]) -> dict[str, Counter]:
    out: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        out[r["dtype"]][r["status"]] += 1
    return out


def explain(model: str, row: dict[str, Any]) -> str:
    """The row's message, shortened: the explanation is gradcheck's own message
    (its cause and place), nothing added here."""
    full = " ".join(str(row["message"]).split())
    msg = full
    if len(msg) > 300:
        msg = msg[:300].rsplit(" ", 1)[0] + " ..."
    if row["status"] == "nondifferentiable":  # the why is in the notes
        msg = full.split(" partial derivative")[0]
        kink = re.search(r"At x, [^:]*: .*?(?=\. [A-Z]|\.$|$)", full)
        if "gradient is right where the function is differentiable" in full:
            msg += "; re-checked at a nearby point: the gradient matches there"
        if kink:
            msg += f"; {kink.group(0)}"
    return msg


def transformers_own(rows: list[dict[str, Any]]) -> set[str]:
    """Models transformers cannot build or run from its default config either:
    outside what gradcheck can answer, so outside the goal's denominator."""
    return {
        r["model"]
        for r in rows
        if r["status"] == "unbuildable" and TRANSFORMERS_OWN in str(r["message"])
    }


def machine() -> str:
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10
        ).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import platform

    return platform.processor() or platform.machine()


def versions() -> str:
    parts = []
    for name in ("torch", "transformers"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    return row["status"] if row["status"] == "passed" else f"**{row['status']}**"


def render(
    rows: list[dict[str, Any]],
    *,
    command: str,
    wall_seconds: float | None,
    partial: str | None = None,
    cpu: str | None = None,
    load: str | None = None,
    expected_models: int | None = None,
    note: str | None = None,
    excluded: dict[str, str] | None = None,
) -> str:
    models = by_model(rows)
    tot = totals(rows)
    outright = [m for m, v in models.items() if _all_passed(v)]
    lines = ["# transformers models, every type (`hf:*`): gradcheck's verdicts", ""]
    if partial:
        lines += [f"> **Partial run.** {partial}", ""]
    wall = (
        str(datetime.timedelta(seconds=round(wall_seconds)))
        if wall_seconds is not None
        else "not recorded"
    )
    lines += [
        f"- command: `{command}`",
        f"- machine: {cpu or machine()}, {os.cpu_count()} cores; {versions()}",
        f"- wall time: {wall} for {len(models)} models"
        + (f" (of {expected_models})" if expected_models else ""),
    ]
    if load:
        lines.append(f"- load: {load}")
    if note:
        lines.append(f"- {note}")
    lines += [
        "",
        "Each model: `AutoConfig.for_model(type)` shrunk (2 layers, width 32, 2 "
        "heads, vocabulary <= 1024, images <= 64, experts <= 4, no dropout), random "
        "weights, eval mode; loss: a seeded random projection of the first output "
        "plus its mean square. fd: finite differences against the backward; "
        "linearity: the two heads' gradients add up; locality: both heads reach "
        "exactly the parameters the output depends on. A status other than passed "
        "is explained by its message in the last section.",
        "",
        "## Totals",
        "",
        "| dtype | checks | " + " | ".join(STATUSES) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in STATUSES) + " |",
    ]
    for dtype in DTYPES:
        c = tot.get(dtype, Counter())
        n = sum(c.values())
        if not n:
            continue
        cells = [
            f"{c[s]} ({100 * c[s] / n:.1f}%)" if s == "passed" else str(c[s])
            for s in STATUSES
        ]
        lines.append(f"| {dtype} | {n} | " + " | ".join(cells) + " |")
    n_models = len(models)
    if n_models:
        lines += [
            "",
            f"Models with every check passed: {len(outright)} of {n_models} "
            f"({100 * len(outright) / n_models:.1f}%). Models with a mismatch: "
            f"{sum(_has(v, 'mismatch') for v in models.values())}; with a "
            f"timeout: {sum(_has(v, 'timeout') for v in models.values())}; "
            f"unbuildable: {sum(_has(v, 'unbuildable') for v in models.values())}.",
        ]
    own = transformers_own(rows)
    if own:
        goal = [r for r in rows if r["model"] not in own]
        gm = by_model(goal)
        lines += [
            "",
            f"### Without the {len(own)} types transformers cannot build or run "
            "from its own default config",
            "",
            "The goal (issue 17) counts the types gradcheck can be asked about: "
            f"{len(gm)} types, {len(goal)} checks.",
            "",
            "| dtype | checks | " + " | ".join(STATUSES) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in STATUSES) + " |",
        ]
        gt = totals(goal)
        for dtype in DTYPES:
            c = gt.get(dtype, Counter())
            n = sum(c.values())
            if n:
                cells = [
                    f"{c[s]} ({100 * c[s] / n:.1f}%)" if s == "passed" else str(c[s])
                    for s in STATUSES
                ]
                lines.append(f"| {dtype} | {n} | " + " | ".join(cells) + " |")
        every = sum(_all_passed(v) for v in gm.values())
        passed = sum(r["status"] == "passed" for r in goal)
        mism = [r for r in goal if r["status"] == "mismatch"]
        confirmed = [r for r in mism if CONFIRMED in str(r["message"])]
        lines += [
            "",
            f"Checks passed outright: {passed} of {len(goal)} "
            f"({100 * passed / max(len(goal), 1):.1f}%); models with every check "
            f"passed: {every} of {len(gm)} ({100 * every / max(len(gm), 1):.1f}%).",
            "",
            f"Mismatches: {len(mism)} checks on "
            f"{len({r['model'] for r in mism})} models. {len(confirmed)} of them "
            "say 'cause confirmed': the gradient with the model's own .detach() "
            "calls passing it agrees with the finite differences, so the "
            "mismatch is a stop-gradient the model applies (by design where it "
            "means to: straight-through estimators, detached reference points); "
            "the others are listed below with their message.",
        ]
    head = [f"{p} {d}" for d in DTYPES for p in PROPERTIES]
    lines += [
        "",
        "## Models",
        "",
        "| model | parameters | " + " | ".join(head) + " | seconds |",
        "| --- | ---: | " + " | ".join("---" for _ in head) + " | ---: |",
    ]
    for model, v in sorted(models.items()):
        cells = [_cell(v["cells"].get((p, d))) for d in DTYPES for p in PROPERTIES]
        lines.append(
            f"| {model.removeprefix('hf:')} | {v['parameters']:,} | "
            + " | ".join(cells)
            + f" | {v['seconds']:.1f} |"
        )
    lines += ["", "## Not passed: every such check and its message", ""]
    any_failed = False
    for model, v in sorted(models.items()):
        if model in own:
            continue
        bad = [(k, r) for k, r in sorted(v["cells"].items()) if r["status"] != "passed"]
        if not bad:
            continue
        any_failed = True
        groups: dict[str, list[str]] = defaultdict(list)
        for (prop, dtype), r in bad:
            groups[f"{r['status']}: {explain(model, r)}"].append(f"{prop} {dtype}")
        for text, where in groups.items():
            lines.append(
                f"- **{model.removeprefix('hf:')}** ({', '.join(where)}) {text}"
            )
    if not any_failed:
        lines.append("None.")
    if own:
        lines += [
            "",
            "## Types transformers cannot build or run from its default config",
            "",
            "Every check of these is `unbuildable`; the reason is transformers' own "
            "(a missing optional library, a config its model code does not accept).",
            "",
        ]
        for model in sorted(own):
            r = next(iter(models[model]["cells"].values()))
            lines.append(f"- **{model.removeprefix('hf:')}**: {explain(model, r)}")
    if excluded:
        lines += [
            "",
            "## Not in `hf:*`",
            "",
            f"{len(excluded)} model types AutoModel knows that `hf:*` leaves out "
            "(gradcheck.backends._hf.excluded()): their main input is another kind, "
            "their forward needs an object no config describes, or it returns only "
            "discrete tensors (codes: no gradient to check). `hf:<type>` by "
            "name reports the same reason as `unbuildable`; "
            "`gradcheck.check_model(model, inputs={...})` checks such a model with "
            "your own inputs (a codes-only model: a submodule with a floating "
            "output).",
            "",
        ]
        for name, why in sorted(excluded.items()):
            lines.append(f"- **{name}**: {' '.join(str(why).split())}")
    return "\n".join(lines) + "\n"


def _all_passed(v: dict[str, Any]) -> bool:
    return bool(v["cells"]) and all(
        r["status"] == "passed" for r in v["cells"].values()
    )


def _has(v: dict[str, Any], status: str) -> bool:
    return any(r["status"] == status for r in v["cells"].values())


def write_models_html(rows: list[dict[str, Any]], path: Path, **extra: Any) -> None:
    """reports/models.html: the report's Models table (one line per check, with
    its message) and the environment. Not the per-check detail `--report` adds
    (a flow graph per check: ~20 MB for 69 models), which reports/models.md
    summarises."""
    from gradcheck.report import build_document, environment, write_html

    doc = build_document(
        [], environment(**extra), title="gradcheck check-model: the hf:* sweep"
    )
    doc["models"] = sorted(rows, key=lambda r: r["model"])
    write_html(path, doc)


def load_rows(json_path: Path | None, lines_path: Path | None) -> list[dict[str, Any]]:
    if json_path is not None and json_path.exists():
        return json.loads(json_path.read_text())["rows"]
    if lines_path is not None:
        return parse_lines(lines_path.read_text(errors="replace"))
    raise SystemExit("no rows: pass --json FILE (a finished run) or --lines FILE")


def run_sweep(reports: Path, jobs: int = 1) -> tuple[float, str, list[dict[str, Any]]]:
    """Run the sweep: COMMAND's checks over ``hf:*`` in ``jobs`` processes, each on
    every jobs-th type with ``cpu_count // jobs`` threads (the models are small:
    two one-thread processes finish the list in about half the time of one
    two-thread process). Printed lines go to reports/models.log; returns (wall
    seconds, load averages before/after, the rows)."""
    from gradcheck.backends import _hf

    exe = shutil.which("gradcheck") or str(Path(sys.executable).parent / "gradcheck")
    types = [f"hf:{t}" for t in _hf.expand_all()]
    jobs = max(1, min(jobs, len(types)))
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(jobs):
            out = Path(tmp) / f"shard{i}"
            cmd = [exe, "check-model", *types[i::jobs], *COMMAND[3:7]]
            cmd += ["--json", str(out.with_suffix(".json"))]
            log = out.with_suffix(".log").open("w")
            procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, env=env), log))
        for proc, log in procs:
            proc.wait()
            log.close()
        wall = time.perf_counter() - started
        rows: list[dict[str, Any]] = []
        with (reports / "models.log").open("w") as log:
            for i in range(jobs):
                shard = Path(tmp) / f"shard{i}"
                log.write(shard.with_suffix(".log").read_text(errors="replace"))
                if shard.with_suffix(".json").exists():
                    rows += json.loads(shard.with_suffix(".json").read_text())["rows"]
                else:  # a shard that died: its printed lines are what is left
                    rows += parse_lines(shard.with_suffix(".log").read_text())
    after = os.getloadavg()
    load = (
        f"1-minute load average {before[0]:.1f} at the start, {after[0]:.1f} at the "
        f"end; {jobs} process(es) with {threads} thread(s) each"
    )
    return wall, load, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run the sweep first (timed)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --run: processes, each on every jobs-th type (default 1)",
    )
    ap.add_argument("--json", type=Path, default=ROOT / "reports" / "models.json")
    ap.add_argument("--lines", type=Path, default=None, help="printed lines instead")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "models.md")
    ap.add_argument(
        "--html-from",
        type=Path,
        default=None,
        help="the run's check-model.html, copied to models.html next to --out "
        "(default: models.html rendered from the rows: the Models table)",
    )
    ap.add_argument("--command", default=" ".join(shlex.quote(c) for c in COMMAND))
    ap.add_argument("--wall-seconds", type=float, default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--partial", default=None, help="say why the run is partial")
    ap.add_argument("--expected-models", type=int, default=None)
    ap.add_argument("--note", default=None)
    args = ap.parse_args(argv)
    wall, load = args.wall_seconds, args.load
    if args.run:
        wall, load, rows = run_sweep(args.out.parent, args.jobs)
        if args.jobs > 1 and args.command == ap.get_default("command"):
            args.command = (
                f"PYTHONPATH=. python benchmarks/model_sweep.py --run --jobs "
                f"{args.jobs} (each job: gradcheck check-model <every "
                f"{args.jobs}th hf:* type> {' '.join(COMMAND[3:7])})"
            )
        args.json.write_text(
            json.dumps({"command": args.command, "rows": rows}, indent=1)
        )
    else:
        rows = load_rows(args.json, args.lines)
    from gradcheck.backends import _hf

    text = render(
        rows,
        excluded=_hf.excluded(),
        command=args.command,
        wall_seconds=wall,
        partial=args.partial,
        load=load,
        expected_models=args.expected_models,
        note=args.note,
    )
    args.out.write_text(text)
    if args.html_from is not None and args.html_from.exists():
        shutil.copyfile(args.html_from, args.out.with_suffix(".html"))
    else:
        write_models_html(
            rows, args.out.with_suffix(".html"), command=args.command, seed=0
        )
    print(text.split("## Models")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
