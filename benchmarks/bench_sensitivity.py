"""Sensitivity on real architectures: the smallest planted bug each dtype catches.

For each transformers architecture (shrunk config, random weights, built as
``gradcheck check-model hf:<type>`` builds it, with its two-head loss), an identity
whose backward scales the incoming gradient by 1 + delta goes on the output of the
first feed-forward Linear of the first block (a forward hook). Two kinds of bug:

* ``both``: the backward is off in every dtype (a wrong custom op);
* ``f32-only``: it is off only when the gradient is float32 (a bug in the float32
  kernel; the float64 path, which gradcheck uses as its reference, is right).

For every delta of a ladder, ``check_model(model, properties="fd", dtype=...)``
runs; the table gives, per architecture and dtype, the verdict on the correct twin
and the smallest delta that was a ``mismatch`` (every larger delta must be one too;
a larger delta that passes is flagged). Goal (issue 17): float32 catches 1e-5,
float64 catches 1e-7, 0 false alarms on the correct twins. A float64 model that
computes in float32 inside (ViT's attention, RMSNorm's cast) is judged on its
cast-free float64 gradient; the notes under the table name those models.

Usage::

    PYTHONPATH=. python benchmarks/bench_sensitivity.py
    PYTHONPATH=. python benchmarks/bench_sensitivity.py --models bert,vit --out reports/sensitivity.md
    PYTHONPATH=. python benchmarks/bench_sensitivity.py --models vit,llama --dtypes float64
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import gradcheck
from gradcheck.backends import _hf
from tests._planted import scaled_backward

MODELS = ("bert", "roberta", "vit", "llama", "mistral", "gpt2", "t5", "whisper")
DELTAS = (1e-3, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 3e-8, 1e-8)
#: names of a block's first feed-forward Linear across transformers' families
FFN = re.compile(
    r"(intermediate\.dense|mlp\.(up_proj|gate_proj|fc1|c_fc)|fc1|DenseReluDense\.wi|wi_0|wi\b)$"
)


def target(model: torch.nn.Module) -> str:
    """The first feed-forward Linear (in module order, so of the first block)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and FFN.search(name):
            return name
    # fall back: the first Linear whose output is wider than its input (an up-projection)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features:
            return name
    raise LookupError(f"{type(model).__name__}: no feed-forward Linear found")


@contextlib.contextmanager
def planted(
    model: torch.nn.Module, name: str, delta: float, only_float32: bool
) -> Iterator[None]:
    fn = scaled_backward(delta, only_float32)
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda _m, _a, out: fn.apply(out)
    )
    try:
        yield
    finally:
        handle.remove()


def check_report(model, inputs, dtype: str):
    (report,) = gradcheck.check_model(
        model, inputs=inputs, dtype=dtype, properties="fd", seed=0
    )
    return report


def check(model, inputs, dtype: str) -> str:
    return check_report(model, inputs, dtype).status


def smallest_caught(model, inputs, name, dtype, only_float32) -> tuple[str, list[str]]:
    """(smallest delta that is a mismatch with every larger one too, anomalies)."""
    caught, odd = None, []
    for delta in DELTAS:
        with planted(model, name, delta, only_float32):
            status = check(model, inputs, dtype)
        if status == "mismatch":
            if caught is None or caught == DELTAS[DELTAS.index(delta) - 1]:
                caught = delta
        elif caught is None and delta >= 1e-5:
            odd.append(f"{delta:g}: {status}")
        if status != "mismatch" and delta < 1e-6:
            break  # below the limit; smaller deltas cannot be caught either
    return ("-" if caught is None else f"{caught:g}"), odd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    lines = [
        "| model | parameters | planted on | dtype | correct twin | smallest delta caught (both paths) | (float32 kernel only) | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for arch in args.models.split(","):
        model, inputs, _ = _hf.build(arch, {}, f"hf:{arch}", 0, 20_000_000)
        n = sum(p.numel() for p in model.parameters())
        name = target(model)
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            twin_report = check_report(model, inputs, dtype)
            twin = twin_report.status
            if "cast-free" in twin_report.tolerance_reason:
                notes.append(
                    f"- {arch} {dtype}: computes in float32 inside; judged on its "
                    "cast-free float64 gradient (the casts run in float64) at float64 "
                    "precision, its own gradient against that one on measured float32 "
                    "rounding"
                )
            both, odd = smallest_caught(model, inputs, name, dtype, False)
            if dtype == "float32":
                only, odd32 = smallest_caught(model, inputs, name, dtype, True)
                odd += [f"f32-only {o}" for o in odd32]
            else:
                only = "n/a"
            s = time.perf_counter() - t0
            row = f"| {arch} | {n:,} | {name} | {dtype} | {twin} | {both} | {only} | {s:.0f} |"
            print(row, flush=True)
            lines.append(row)
            if odd:
                notes.append(f"- {arch} {dtype}: large deltas not caught: {odd}")
    text = "\n".join(lines + [""] + notes)
    cpu = platform.processor() or platform.machine()
    header = (
        f"Command: `PYTHONPATH=. python benchmarks/bench_sensitivity.py "
        f"--models {args.models} --dtypes {args.dtypes}`; torch {torch.__version__}, "
        f"{cpu}.\n\n"
    )
    if args.out:
        args.out.write_text(header + text + "\n")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
