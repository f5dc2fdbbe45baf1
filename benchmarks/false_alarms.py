"""False alarms and misses over many seeded multi-head models, ReLU included.

Runs the audit's cases (gradcheck/audit.py: a trunk, a main head and an auxiliary
head with a random loss weight; correct and planted-bug variants) for N models per
framework and dtype, with smooth and ReLU activations, and counts every verdict:

* correct models: "passed" is right; "nondifferentiable" is allowed for ReLU
  (a kink crossed); "mismatch" is a false alarm;
* planted bugs (backward off by 1e-5 in float64, 1e-3 in float32; a detached
  auxiliary branch): anything but "passed" is a catch.

Usage: PYTHONPATH=. python benchmarks/false_alarms.py [--examples N] [--json P]
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


def run(examples: int, seed: int, frameworks: list[str]) -> dict:
    acts = ("tanh", "gelu", "softplus", "relu")
    counts: Counter = Counter()
    seconds: Counter = Counter()
    for fw in frameworks:
        if not audit.available(fw):
            continue
        for case in audit.cases(fw, examples, seed, activations=acts):
            t0 = time.perf_counter()
            status = case.run().status
            seconds[fw] += time.perf_counter() - t0
            kind = "correct" if case.expect_pass else "planted"
            counts[(fw, case.dtype, case.property, kind, status)] += 1
    rows = [
        {
            "framework": k[0],
            "dtype": k[1],
            "property": k[2],
            "model": k[3],
            "status": k[4],
            "count": n,
        }
        for k, n in sorted(counts.items())
    ]
    false_alarms = sum(
        r["count"]
        for r in rows
        if r["model"] == "correct" and r["status"] == "mismatch"
    )
    misses = sum(
        r["count"] for r in rows if r["model"] == "planted" and r["status"] == "passed"
    )
    return {
        "examples_per_framework_and_dtype": examples,
        "seed": seed,
        "activations": acts,
        "rows": rows,
        "false_alarms": false_alarms,
        "misses": misses,
        "seconds": dict(seconds),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--framework", choices=[*audit.FRAMEWORKS, "all"], default="all")
    p.add_argument("--json", type=Path, default=Path("reports/false_alarms.json"))
    args = p.parse_args()
    fws = list(audit.FRAMEWORKS) if args.framework == "all" else [args.framework]
    result = run(args.examples, args.seed, fws)
    for r in result["rows"]:
        print(
            f"{r['framework']:<11} {r['dtype']:<8} {r['property']:<18} "
            f"{r['model']:<8} {r['status']:<18} {r['count']:>5}"
        )
    print(
        f"false alarms (mismatch on a correct model): {result['false_alarms']}; "
        f"misses (planted bug passed): {result['misses']}; "
        f"seconds: {', '.join(f'{k} {v:.1f}' for k, v in result['seconds'].items())}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
