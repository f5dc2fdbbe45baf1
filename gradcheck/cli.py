"""``gradcheck audit``: the project's main job, from the command line.

Exit codes: 0 every case as expected, 1 a case failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from gradcheck import audit
from gradcheck._io import atomic_write_text
from gradcheck.errors import GradcheckError


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradcheck", description="Are your gradients right? Checks and audits."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    a = sub.add_parser(
        "audit",
        help="check this machine's frameworks on seeded multi-head models",
        description=(
            "Check that the installed frameworks compute the gradients a weighted "
            "multi-head loss implies (finite differences, linearity), on seeded "
            "models with and without planted bugs, in float32 and float64."
        ),
    )
    a.add_argument(
        "--framework",
        choices=[*audit.FRAMEWORKS, "all"],
        default="all",
        help="framework to audit. Default: %(default)s (those installed)",
    )
    a.add_argument(
        "--examples",
        type=_positive,
        default=3,
        metavar="N",
        help="seeded models per framework and dtype. Default: %(default)s",
    )
    a.add_argument(
        "--seed", type=_seed, default=0, metavar="S", help="Default: %(default)s"
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command != "audit":
        parser().print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported
    frameworks = list(audit.FRAMEWORKS) if args.framework == "all" else [args.framework]
    printer = _Printer()
    result = audit.run(frameworks, args.examples, args.seed, on_outcome=printer.outcome)
    data = result.to_dict()
    write_json(args.json, data)
    try:
        from gradcheck.report import from_audit, write_html

        write_html(args.report, from_audit(data))
        written = f"{args.report} and {args.json}"
    except GradcheckError as exc:  # Jinja2 missing: the JSON still stands
        written = f"{args.json} (no HTML: {exc})"
    printer.summary(result, written)
    return 0 if result.ok else 1


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: a reader never sees a half-written report."""
    atomic_write_text(path, json.dumps(data, indent=2))


class _Printer:
    """Terminal output through rich when installed, plain text otherwise."""

    def __init__(self) -> None:
        try:
            from rich.console import Console

            # soft_wrap: one line per case, also in CI logs 80 columns wide
            self.console: Any = Console(highlight=False, soft_wrap=True)
        except ImportError:  # pragma: no cover - rich is in the report/dev extras
            self.console = None

    def _print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)
        else:  # pragma: no cover
            print(_strip_markup(text))

    def outcome(self, o: audit.Outcome) -> None:
        mark = "[green]  ok[/]" if o.ok else "[bold red]FAIL[/]"
        verdict = o.report.status if o.report is not None else f"error: {o.error}"
        self._print(f"{mark} {o.case.name:<66} {verdict:<17} {o.seconds:5.2f}s")
        if not o.ok and o.report is not None:
            self._print(_escape(o.report.message()))

    def summary(self, result: audit.AuditResult, written: str) -> None:
        rows: dict[tuple[str, str, str], list[int]] = {}
        for o in result.outcomes:
            key = (o.case.framework, o.case.dtype, o.case.property)
            rows.setdefault(key, [0, 0])[0 if o.ok else 1] += 1
        if self.console is not None:
            from rich.table import Table

            table = Table(title="gradcheck audit")
            for col in ("framework", "dtype", "property", "as expected", "not"):
                table.add_column(col)
            for (fw, dt, prop), (ok, bad) in sorted(rows.items()):
                table.add_row(fw, dt, prop, str(ok), f"[red]{bad}[/]" if bad else "0")
            self.console.print(table)
        for fw, why in result.skipped.items():
            self._print(f"skipped {fw}: {why}")
        n_ok = sum(o.ok for o in result.outcomes)
        verdict = "[green]all as expected[/]" if result.ok else "[bold red]FAILED[/]"
        self._print(
            f"{n_ok}/{len(result.outcomes)} cases as expected in {result.seconds:.1f}s: "
            f"{verdict}; reports: {written}"
        )


def _escape(text: str) -> str:
    return text.replace("[", "\\[")


def _strip_markup(text: str) -> str:  # pragma: no cover
    import re

    return re.sub(r"\[/?[a-z ]*\]", "", text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
