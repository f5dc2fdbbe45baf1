"""False alarms, misses and examples per second of the audit's property suite.

Runs every audit job (gradcheck/audit.py: one property x framework x dtype, on
generated multi-head models, correct or with a planted bug) with N generated models
each and counts verdicts:

* correct models: every report must be "passed"; anything else is a false alarm;
* planted bugs: only "mismatch" is a catch; anything else is a miss ("passed",
  and also "nondifferentiable" or "nondeterministic": the check did not judge
  the planted gradient wrong).

A job that finds a counterexample stops there and shrinks it (that is the audit's
job); this script prints it and counts the examples run up to it.

Usage::

    PYTHONPATH=. python benchmarks/false_alarms.py --examples 250 \
        [--dtype float32] [--framework torch] [--json reports/false_alarms.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from gradcheck import audit  # noqa: E402


def run(examples: int, seed: int, frameworks: list[str], dtypes: list[str]) -> dict:
    present = [fw for fw in frameworks if audit.available(fw)]
    rows = []
    for i, job in enumerate(audit.jobs(present, seed)):
        if job.dtype not in dtypes or job.skip is not None:
            continue
        out = audit.run_job(job, examples, seed + i)
        statuses = Counter(out.statuses)
        n = out.examples
        if job.expect_pass:
            wrong = n - statuses.get("passed", 0)
        else:
            wrong = n - statuses.get("mismatch", 0)
        row = {
            "job": job.name,
            "framework": job.framework,
            "dtype": job.dtype,
            "property": job.property,
            "kind": "correct" if job.expect_pass else "planted",
            "examples": n,
            "statuses": dict(statuses),
            "false_alarms" if job.expect_pass else "misses": wrong,
            "seconds": round(out.seconds, 2),
            "examples_per_second": round(n / out.seconds, 2) if out.seconds else None,
            "verdict": out.verdict,
            "error": out.error,
            "counterexample": out.code,
        }
        rows.append(row)
        print(
            f"{job.name:<78} n={n:<5} {dict(statuses)} {out.seconds:7.1f}s "
            f"{row['examples_per_second']}/s {out.verdict}",
            flush=True,
        )
        if out.code:
            print(out.report.message() if out.report is not None else out.error)
            print(out.code)
    totals: dict = {}
    for fw in {r["framework"] for r in rows}:
        mine = [r for r in rows if r["framework"] == fw]
        totals[fw] = {
            "correct_examples": sum(
                r["examples"] for r in mine if r["kind"] == "correct"
            ),
            "false_alarms": sum(r.get("false_alarms", 0) for r in mine),
            "planted_examples": sum(
                r["examples"] for r in mine if r["kind"] == "planted"
            ),
            "misses": sum(r.get("misses", 0) for r in mine),
            "seconds": round(sum(r["seconds"] for r in mine), 1),
        }
        t = totals[fw]
        t["examples_per_second"] = round(
            (t["correct_examples"] + t["planted_examples"]) / t["seconds"], 2
        )
    return {"examples_per_job": examples, "seed": seed, "totals": totals, "jobs": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--framework", choices=[*audit.FRAMEWORKS, "all"], default="all")
    p.add_argument("--dtype", choices=[*audit.DTYPES, "all"], default="all")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    fws = list(audit.FRAMEWORKS) if args.framework == "all" else [args.framework]
    dtypes = list(audit.DTYPES) if args.dtype == "all" else [args.dtype]
    started = time.perf_counter()
    res = run(args.examples, args.seed, fws, dtypes)
    res["wall_seconds"] = round(time.perf_counter() - started, 1)
    for fw, t in res["totals"].items():
        print(
            f"{fw}: {t['correct_examples']} correct models, false alarms "
            f"{t['false_alarms']}; {t['planted_examples']} planted, misses "
            f"{t['misses']}; {t['seconds']}s, {t['examples_per_second']} examples/s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
