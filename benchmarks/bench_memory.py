"""Peak memory of a gradient check against one training step (issue 17).

"A check's peak memory stays near an Adam step's": this script measures both on
BERT-base (transformers ``BertConfig()`` default sizes: 12 layers, hidden 768,
~110M parameters; random weights, nothing downloaded), batch 2 x 128 tokens.

Each measurement runs in a fresh Python process (the parent only starts them and
prints), which builds the model and its inputs, reads its resident set (VmRSS),
resets the kernel's high-water mark (``/proc/self/clear_refs``, where allowed)
and runs one of:

* ``adam``: one float32 training step: zero_grad, forward, backward,
  ``torch.optim.Adam`` step (its two moment buffers are allocated in it, as in a
  first training step);
* ``adam64``: the same step on the model in float64 (converted before the
  resident set is read: a float64 training run holds a float64 model), what the
  float64 check is compared with;
* ``check32`` / ``check64``: ``gradcheck.check_model(model, inputs=...,
  dtype=..., properties="fd")``, the finite-difference check as ``gradcheck
  check-model`` runs it (float64: on a float64 copy of the model it makes);
* ``bug32`` / ``bug32k`` / ``bug64``: the same check of the model with a planted
  bug (see BUGS): a failing check, with its diagnosis (measured rounding's
  draws, the precision split, blame by bisection).

It reports the peak resident set (VmHWM, else ``ru_maxrss``) and the peak above
the resident set before the operation (the model, inputs and imports excluded).
torch allocates outside Python's heap, so tracemalloc would see none of it.
Usage::

    PYTHONPATH=. python benchmarks/bench_memory.py [--what adam,check32,adam64,check64]
        [--layers N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BATCH, TOKENS, SEED = 2, 128, 0
WHAT = ("adam", "check32", "adam64", "check64")
#: failing checks: a planted bug (an identity whose backward scales the gradient by
#: 1 + DELTA) on the output of the first block's intermediate Linear, in every
#: precision (``bug32``, ``bug64``) or in the float32 kernel alone (``bug32k``,
#: the float64 path right: the precision split's path)
BUGS = {
    "bug32": ("float32", False),
    "bug32k": ("float32", True),
    "bug64": ("float64", False),
}
DELTA = 1e-3


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kb(reset: bool) -> int:
    hwm = _status_kb("VmHWM") if reset else None
    return (
        hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )


def one(what: str, layers: int | None) -> dict:
    """Run one measurement in this process; the numbers as a dict."""
    import torch
    import transformers

    import gradcheck

    torch.manual_seed(SEED)
    config = transformers.BertConfig()  # BERT-base sizes
    if layers is not None:
        config.num_hidden_layers = layers
    model = transformers.BertModel(config)
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1, config.vocab_size, (BATCH, TOKENS), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n = sum(p.numel() for p in model.parameters())
    if what in ("adam", "adam64"):
        if what == "adam64":
            model = model.double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        dtype = next(model.parameters()).dtype
        proj = torch.randn(config.hidden_size, generator=gen, dtype=dtype)

        def run() -> str:
            opt.zero_grad(set_to_none=True)
            out = model(**inputs).last_hidden_state
            loss = (out @ proj).mean() + 0.1 * (out**2).mean()
            loss.backward()
            opt.step()
            return "step"
    else:
        if what in BUGS:
            from tests._planted import scaled_backward

            dtype, only32 = BUGS[what]
            plant = scaled_backward(DELTA, only_float32=only32)
            model.encoder.layer[0].intermediate.dense.register_forward_hook(
                lambda mod, args, out: plant.apply(out)
            )
        else:
            dtype = {"check32": "float32", "check64": "float64"}[what]

        def run() -> str:
            reports = gradcheck.check_model(
                model,
                inputs=inputs,
                dtype=dtype,
                properties="fd",
                max_parameters=10**12,
                shrink=False,
            )
            return ", ".join(r.status for r in reports)

    before = _status_kb("VmRSS") or 0
    reset = _reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    result = run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak_kb(reset)
    return {
        "what": what,
        "parameters": n,
        "result": result,
        "rss_before_mb": before / 1024,
        "peak_mb": peak / 1024,
        "peak_above_before_mb": (peak - before) / 1024,
        "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss",
        "seconds": seconds,
        "cpu_seconds": cpu,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default=",".join(WHAT))
    parser.add_argument("--layers", type=int, default=None, help="default: 12")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child: one measurement, JSON on stdout's last line
        print(json.dumps(one(args.one, args.layers)))
        return
    rows = []
    for what in args.what.split(","):
        cmd = [sys.executable, __file__, "--one", what]
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            print(f"{what}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"BERT-base (BertConfig(){'' if args.layers is None else f', {args.layers} layers'}), "
        f"batch {BATCH} x {TOKENS} tokens; one fresh process per row"
    )
    print(
        f"{'what':<10} {'params':>12} {'RSS before MB':>14} {'peak MB':>9} "
        f"{'peak-before MB':>15} {'s':>7} {'cpu s':>7}  result"
    )
    for r in rows:
        print(
            f"{r['what']:<10} {r['parameters']:>12,} {r['rss_before_mb']:>14.0f} "
            f"{r['peak_mb']:>9.0f} {r['peak_above_before_mb']:>15.0f} "
            f"{r['seconds']:>7.1f} {r['cpu_seconds']:>7.1f}  {r['result']}"
        )
    by = {r["what"]: r for r in rows}
    for what, step in (
        ("check32", "adam"),
        ("check64", "adam"),
        ("check64", "adam64"),
        ("bug32", "adam"),
        ("bug32k", "adam"),
        ("bug32k", "adam64"),
        ("bug64", "adam64"),
    ):
        if what in by and step in by:
            print(
                f"{what} / {step}: peak {by[what]['peak_mb'] / by[step]['peak_mb']:.2f}x, "
                f"above the model {by[what]['peak_above_before_mb'] / by[step]['peak_above_before_mb']:.2f}x"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
