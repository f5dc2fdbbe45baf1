"""``gradcheck audit``: the project's main job, from the command line
(``gradcheck`` console script, ``python -m gradcheck``).

Exit codes: 0 every job as expected, 1 a job failed (a property does not hold or a
planted bug went unseen), 2 usage error (including a device that is not there).

Output: rich progress bars in a terminal; without one (CI logs, a pipe), one line
per finished job with its time. Then a summary table (seconds per job) and the
reports. The noise gradcheck itself causes in the frameworks (TensorFlow's dtype
promotion and retracing messages, its import banner) is dropped; see
:mod:`gradcheck._quiet`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradcheck
from gradcheck import audit
from gradcheck._io import atomic_write_text
from gradcheck._quiet import import_quietly
from gradcheck.errors import GradcheckError

PROGRESS_CHOICES = ("auto", "bars", "lines")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {value}"
        )
    return value


def _workers(text: str) -> int:
    if text == "auto":
        return min(MAX_AUTO_WORKERS, os.cpu_count() or 1)
    return _positive(text)


#: ``--workers auto``: one process per CPU core, at most this many (each imports
#: the frameworks: about a gigabyte of memory and a few seconds)
MAX_AUTO_WORKERS = 4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradcheck", description="Are your gradients right? Checks and audits."
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"gradcheck {gradcheck.__version__}",
        help="print gradcheck's version and exit",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    a = sub.add_parser(
        "audit",
        help="check this machine's frameworks on generated multi-head models",
        description=(
            "Check that the installed frameworks compute the gradients a weighted "
            "multi-head loss implies: finite differences, linearity, locality, the "
            "training paths (PyTorch step, Keras compile/fit), torch vs Keras and "
            "CPU vs GPU, on generated models, correct and with planted bugs. A "
            "counterexample is shrunk to a minimal model and printed as code."
        ),
    )
    a.add_argument(
        "--framework",
        choices=[*audit.FRAMEWORKS, "all"],
        default="all",
        help="framework to audit. Default: %(default)s (those installed)",
    )
    a.add_argument(
        "--device",
        choices=list(audit.DEVICE_CHOICES),
        default="auto",
        help="devices to audit: auto = every available one (CPU and any GPU). "
        "Default: %(default)s",
    )
    a.add_argument(
        "--examples",
        type=_positive,
        default=None,
        metavar="N",
        help="generated models per job (property x framework x dtype x correct/"
        f"planted). Default: the profile's (ci: {audit.PROFILES['ci']}, thorough: "
        f"{audit.PROFILES['thorough']})",
    )
    a.add_argument(
        "--profile",
        choices=list(audit.PROFILES),
        default="ci",
        help=f"how hard to search: ci ({audit.PROFILES['ci']} models per job) or "
        f"thorough ({audit.PROFILES['thorough']}). Default: %(default)s",
    )
    a.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="S",
        help="seed of the searches and checks (job i uses S+i); the same seed "
        "draws the same models. Default: %(default)s",
    )
    a.add_argument(
        "--report",
        type=Path,
        default=Path("reports/audit.html"),
        metavar="PATH",
        help="where to write the self-contained HTML report. Default: %(default)s",
    )
    a.add_argument(
        "--json",
        type=Path,
        default=Path("reports/audit.json"),
        metavar="PATH",
        help="where to write the JSON report. Default: %(default)s",
    )
    a.add_argument(
        "--threads",
        type=_positive,
        default=audit.DEFAULT_THREADS,
        metavar="N",
        help="torch's intra-op threads during the audit, restored afterwards (the "
        "generated models are tiny: more threads cost more CPU than they save). "
        "Default: %(default)s",
    )
    a.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        metavar="N|auto",
        help="processes running jobs side by side; the outcomes do not depend on it. "
        f"auto: one per CPU core, at most {MAX_AUTO_WORKERS} (here "
        f"{_workers('auto')}). Default: %(default)s",
    )
    a.add_argument(
        "--repro-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a repro bundle to DIR for each job's failing check (a planted "
        "bug caught, a counterexample): the architecture spec, batch, seed and "
        "versions; rerun one with 'gradcheck replay BUNDLE'. Default: none (no bundles)",
    )
    a.add_argument(
        "--progress",
        choices=PROGRESS_CHOICES,
        default="auto",
        help="bars: rich progress bars; lines: one line per finished job with its "
        "time; auto: bars in a terminal, lines otherwise (CI logs). "
        "Default: %(default)s",
    )
    _check_model_parser(sub)
    _replay_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "check-model":
        return _check_model_main(args)
    if args.command == "replay":
        return _replay_main(args)
    if args.command != "audit":
        p.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported
    frameworks = list(audit.FRAMEWORKS) if args.framework == "all" else [args.framework]
    examples = args.examples or audit.PROFILES[args.profile]
    printer = _Printer(args.progress)
    for fw in frameworks:
        if audit.available(fw):  # its import banner, before the audit's clock starts
            import_quietly(fw)
    try:
        with printer.progress() as progress:
            result = audit.run(
                frameworks,
                examples,
                args.seed,
                on_start=progress.start,
                on_example=progress.advance,
                on_outcome=progress.done,
                device=args.device,
                threads=args.threads,
                workers=args.workers,
            )
    except GradcheckError as exc:  # e.g. --device cuda without a GPU
        printer.error(str(exc))
        return 2
    bundles = _audit_bundles(result, args.repro_dir, args.seed, printer)
    data = result.to_dict()
    if args.repro_dir is not None:
        data["repro_bundles"] = bundles
    data["command"] = {
        "framework": args.framework,
        "device": args.device,
        "examples": examples,
        "profile": args.profile,
        "seed": args.seed,
    }
    write_json(args.json, data)
    try:
        from gradcheck.report import from_audit, write_html

        write_html(args.report, from_audit(data))
        written = f"{args.report} and {args.json}"
    except GradcheckError as exc:  # Jinja2 missing: the JSON still stands
        written = f"{args.json} (no HTML: {exc})"
    printer.summary(result, written)
    return 0 if result.ok else 1


def _audit_bundles(
    result: audit.AuditResult, repro_dir: Path | None, seed: int, printer: _Printer
) -> list[str]:
    """``--repro-dir``: one bundle per job with a failing check (its report
    names the bundle, and so do the JSON/HTML reports)."""
    if repro_dir is None:
        return []
    from gradcheck import repro

    written = []
    for i, outcome in enumerate(result.outcomes):
        path = repro.write_audit_bundle(repro_dir, outcome, seed + i, seed)
        if path is not None:
            written.append(str(path))
    printer._print(f"{len(written)} repro bundles in {_escape(str(repro_dir))}")
    return written


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: a reader never sees a half-written report."""
    atomic_write_text(path, json.dumps(data, indent=2))


class _Printer:
    """Terminal output through rich: bars in a terminal, lines in logs."""

    def __init__(self, progress: str = "auto") -> None:
        from rich.console import Console

        # soft_wrap: a long line stays one line (CI logs, grep)
        self.console = Console(highlight=False, soft_wrap=True)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            self.console.width = 160  # a log is no 80-column terminal: keep rows whole
        if progress == "auto":
            progress = "bars" if self.console.is_terminal else "lines"
        self.mode = progress

    def _print(self, text: str) -> None:
        self.console.print(text)

    def error(self, text: str) -> None:
        self._print(f"[bold red]gradcheck audit: error:[/] {_escape(text)}")

    @contextlib.contextmanager
    def progress(self) -> Iterator[_Progress]:
        if self.mode == "lines":
            yield _Progress(None, self)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        with bars:
            yield _Progress(bars, self)

    def outcome(self, o: audit.Outcome) -> None:
        if o.job.skip is not None:
            self._print(f"[yellow]skip[/] {_escape(o.job.name)}: {_escape(o.job.skip)}")
            return
        if o.ok:
            return
        self._print(f"[bold red]FAIL[/] {_escape(o.job.name)}: {o.verdict}")
        if o.report is not None:
            self._print(_escape(o.report.message()))
        if o.error is not None:
            self._print(_escape(o.error))
        if o.code is not None:
            self._print(
                f"shrunk counterexample after {o.shrink_steps} shrink steps; "
                "this code reproduces it:"
            )
            self._print(_escape(o.code))

    def finished(self, o: audit.Outcome, done: int) -> None:
        """Lines mode: one line per finished job, with its time."""
        if o.job.skip is not None:
            return  # said by outcome()
        mark = "[green]ok[/]  " if o.ok else "[bold red]FAIL[/]"
        self._print(
            f"{mark} \\[{done}] {_escape(o.job.name)}: {o.verdict}, "
            f"{o.examples} models, {o.seconds:.1f} s"
        )

    def summary(self, result: audit.AuditResult, written: str) -> None:
        ran = [o for o in result.outcomes if o.job.skip is None]
        if ran:
            from rich.table import Table

            table = Table(title="gradcheck audit")
            for col in ("framework", "dtype", "property", "on", "models"):
                table.add_column(col)
            table.add_column("verdict")
            table.add_column("s", justify="right")
            for o in ran:
                on = "correct models" if o.job.planted is None else o.job.planted
                colour = "green" if o.ok else "bold red"
                table.add_row(
                    o.job.framework,
                    o.job.dtype,
                    o.job.property,
                    _escape(on),
                    str(o.examples),
                    f"[{colour}]{o.verdict}[/]",
                    f"{o.seconds:.1f}",
                )
            self.console.print(table)
        for o in result.outcomes:
            if o.job.skip is not None:
                self._print(f"skipped {_escape(o.job.name)}: {_escape(o.job.skip)}")
        for fw, why in result.skipped.items():
            self._print(f"skipped {fw}: {why}")
        n_ok = sum(o.ok for o in ran)
        models = sum(o.examples for o in ran)
        verdict = (
            "[green]every property holds[/]" if result.ok else "[bold red]FAILED[/]"
        )
        self._print(
            f"{n_ok}/{len(ran)} jobs as expected ({models} generated models) in "
            f"{result.seconds:.1f}s ({result.cpu_seconds:.1f}s CPU): {verdict}; "
            f"reports: {written}"
        )


class _Progress:
    """One progress bar per job (property x framework x dtype x correct/planted),
    or one line per finished job."""

    def __init__(self, bars: Any, printer: _Printer) -> None:
        self.bars, self.printer = bars, printer
        self.tasks: dict[int, Any] = {}  # id(job): its bar (jobs run side by side)
        self.done_count = 0

    def start(self, job: audit.Job, examples: int) -> None:
        if self.bars is not None:
            self.tasks[id(job)] = self.bars.add_task(_escape(job.name), total=examples)

    def advance(self, job: audit.Job) -> None:
        if self.bars is not None and id(job) in self.tasks:
            self.bars.advance(self.tasks[id(job)])

    def done(self, o: audit.Outcome) -> None:
        self.done_count += 1
        task = self.tasks.get(id(o.job))
        if self.bars is not None and task is not None:
            mark = "[green]ok[/]" if o.ok else "[bold red]FAIL[/]"
            self.bars.update(
                task,
                description=f"{mark} {_escape(o.job.name)} ({o.verdict}, "
                f"{o.seconds:.1f} s)",
                completed=o.examples,
                total=max(o.examples, 1),
            )
        elif self.bars is None:
            self.printer.finished(o, self.done_count)
        self.printer.outcome(o)


def _escape(text: str) -> str:
    return text.replace("[", "\\[")


# ------------------------------------------------------------------ check-model
def _choices(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}"
            )
        return tuple(dict.fromkeys(items))

    return parse


def _timeout(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value or None


def _loss_weights(text: str) -> dict[str, float]:
    from gradcheck import models

    try:
        return models.parse_weights(text)
    except GradcheckError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_model_parser(sub: Any) -> None:
    from gradcheck import models

    m = sub.add_parser(
        "check-model",
        help="check real architectures by name (hf:bert, keras:MobileNetV3Small, "
        "package.module:callable)",
        description=(
            "Build each model (transformers configs shrunk, random weights, nothing "
            "downloaded), put a two-head loss on its first output and run the "
            "finite-difference, linearity and locality checks. One line per model x "
            "property x dtype. Exit 0: no mismatch; 1: a mismatch; 2: usage error."
        ),
    )
    m.add_argument(
        "specs",
        nargs="+",
        metavar="SPEC",
        help="hf:<model_type>[?key=value&...] (hf:* = every model type taking token "
        "ids, pixel values or audio), keras:<Application>, package.module:callable",
    )
    m.add_argument(
        "--dtype",
        type=_choices(models.DTYPES),
        default=("float32",),
        metavar="float32,float64",
        help="dtypes to check, comma-separated. Default: float32",
    )
    m.add_argument(
        "--properties",
        type=_choices(models.PROPERTIES),
        default=models.PROPERTIES,
        metavar="fd,linearity,locality",
        help="properties to check, comma-separated. Default: all three",
    )
    m.add_argument(
        "--timeout",
        type=_timeout,
        default=300.0,
        metavar="S",
        help="seconds per check (each model runs in a worker process, killed at the "
        "limit: status timeout); 0: no limit, in this process. Default: 300",
    )
    m.add_argument("--seed", type=_seed, default=0, metavar="S", help="Default: 0")
    m.add_argument(
        "--weights",
        type=_loss_weights,
        default=None,
        metavar="main=W,aux=W",
        help="the two heads' loss weights, e.g. a set a shrink printed: "
        "main=1.0,aux=0.0. Default: drawn by Hypothesis from --seed",
    )
    m.add_argument(
        "--no-shrink",
        dest="shrink",
        action="store_false",
        help="do not shrink a mismatch's loss weights. Default: shrink (at most "
        "10 extra checks, about the failing check's own time)",
    )
    m.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help="write DIR/check-model.html (self-contained)",
    )
    m.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="write the rows as JSON"
    )
    m.add_argument(
        "--repro-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a repro bundle to DIR for each failing check (spec, weights, "
        "inputs, seed, dtype, versions); rerun one with 'gradcheck replay BUNDLE'. "
        "Default: none (no bundles)",
    )


def _check_model_main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gradcheck import models

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as audit: before TF loads
    console = Console(highlight=False, soft_wrap=True)
    if any(s.split("?")[0] == "hf:*" for s in args.specs):
        console.print("expanding hf:* (reading every transformers model class) ...")
    try:
        specs = models.expand_specs(args.specs)
    except GradcheckError as exc:
        console.print(f"[bold red]gradcheck check-model: error:[/] {_escape(str(exc))}")
        return 2
    weights = args.weights or models.draw_weights(args.seed)
    source = "given" if args.weights else f"drawn by Hypothesis from seed {args.seed}"
    console.print(
        "loss: main (a seeded random projection of the first output) x "
        f"{weights['main']:g} + aux (its mean square) x {weights['aux']:g}; weights "
        f"{source}"
    )
    reports: list[Any] = []
    for n, spec in enumerate(specs, 1):
        try:
            got = models.check_model(
                spec,
                dtype=args.dtype,
                properties=args.properties,
                seed=args.seed,
                timeout=args.timeout,
                repro_dir=args.repro_dir,
                weights=args.weights,
                shrink=args.shrink,
            )
        except GradcheckError as exc:
            console.print(
                f"[bold red]gradcheck check-model: error:[/] {_escape(str(exc))}"
            )
            return 2
        for report in got:
            r = models.row(report)
            colour = {"passed": "green", "mismatch": "bold red"}.get(
                r["status"], "yellow"
            )
            first = (r["message"].splitlines() or [""])[0]
            console.print(
                f"[{colour}]{r['status']:<17}[/] {_escape(r['model'])} {r['property']} "
                f"{r['dtype']}  {r['seconds']:.1f} s  {r['parameters']:,} params  "
                f"{_escape(first)}"
                + (f"  \\[{n}/{len(specs)}]" if len(specs) > 1 else "")
            )
            for note in report.notes:  # check_model's loss-weight shrink
                if note.startswith("fails with weights"):
                    console.print(f"  {_escape(note)}")
            if report.repro_bundle:
                console.print(f"  repro bundle: {_escape(report.repro_bundle)}")
        reports.extend(got)
    rows = [models.row(r) for r in reports]
    if args.json is not None:
        write_json(
            args.json,
            {
                "command": "check-model",
                "seed": args.seed,
                "weights": weights,
                "rows": rows,
            },
        )
    if args.report is not None:
        from gradcheck.report import build_document, environment, write_html

        doc = build_document(
            [{"id": r.label, "report": r} for r in reports],
            environment(seed=args.seed),
            title="gradcheck check-model",
        )
        doc["models"] = rows
        write_html(args.report / "check-model.html", doc)
    mismatches = sum(r["status"] == "mismatch" for r in rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    detail = ", ".join(f"{n} {s}" for s, n in counts.items())
    console.print(f"{len(rows)} checks on {len(specs)} models: {detail}")
    return 1 if mismatches else 0


# ------------------------------------------------------------------ replay
def _replay_parser(sub: Any) -> None:
    r = sub.add_parser(
        "replay",
        help="rerun a repro bundle (written by --repro-dir / repro_dir=)",
        description=(
            "Rerun the failing check a repro bundle recorded, here, and say whether "
            "its verdict reproduces; installed versions that differ from the "
            "bundle's are listed. Exit 0: reproduced; 1: not reproduced; 2: a "
            "missing, corrupt or not replayable bundle (the message says what)."
        ),
    )
    r.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle directory")


def _replay_main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gradcheck import repro

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    console = Console(highlight=False, soft_wrap=True)
    try:
        result = repro.replay(args.bundle)
    except GradcheckError as exc:
        console.print(f"[bold red]gradcheck replay: error:[/] {_escape(str(exc))}")
        return 2
    for line in result.lines():
        console.print(_escape(line))
    return 0 if result.reproduced else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
