"""The report document: the one data shape behind gradcheck's JSON and HTML reports.

::

    {
      "schema": "gradcheck-report/1",
      "title": str,
      "generated": ISO-8601 UTC time,
      "gradcheck_version": str,
      "environment": {name: value},           # versions, seed, device, ...
      "checks": [
        {"id": str,                            # a test node id, an audit case
         "outcome": "ok" | "failed" | "skipped",   # a "skipped" report: skipped
         "report": CheckReport.to_dict() | None,
         "error": str,                         # optional: why there is no report
         "expected": "passed" | "caught",      # optional: audits
         "examples": str,                      # optional: audits, models searched
                                               #   and the job's seconds
         "code": str,                          # optional: a shrunk counterexample
         "worker": str},                       # optional: the xdist worker
        ...
      ],
      "summary": {"checks", "ok", "failed", "by_status", "by_property",
                  "frameworks", "dtypes", "devices", "seeds", "failed_ids"},
      "models": [{"model", "property", "dtype", "status", "seconds",
                  "parameters", "message"}],   # optional: gradcheck check-model
    }

:func:`build_document` makes one from records (the pytest plugin, the CLI);
:func:`from_audit` from ``AuditResult.to_dict()``. Pure data, no Jinja2 needed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from collections.abc import Iterable, Mapping
from typing import Any

from gradcheck.result import STATUSES

__all__ = ["OUTCOMES", "SCHEMA", "build_document", "environment", "from_audit"]

SCHEMA = "gradcheck-report/1"
OUTCOMES = ("ok", "failed", "skipped")
#: distributions whose versions an environment lists, found without importing them
_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "keras": ("keras",),
}


def environment(**extra: Any) -> dict[str, Any]:
    """Python, platform and installed framework versions (read from package
    metadata: no framework is imported), then ``extra`` (seed, device, ...)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name, dists in _DISTRIBUTIONS.items():
        for dist in dists:
            try:
                env[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    env.update(extra)
    return env


def build_document(
    records: Iterable[Mapping[str, Any]],
    environment: Mapping[str, Any] | None = None,
    title: str = "gradcheck report",
) -> dict[str, Any]:
    """The report document for ``records``: mappings with an ``id``, a ``report``
    (``CheckReport.to_dict()``, a :class:`~gradcheck.CheckReport`, or None with an
    ``error``) and optionally an ``outcome`` ("ok"/"failed"; default: whether the
    report passed) and ``expected``."""
    from gradcheck import __version__

    checks = [_check(i, rec) for i, rec in enumerate(records)]
    return {
        "schema": SCHEMA,
        "title": str(title),
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "gradcheck_version": __version__,
        "environment": dict(environment or {}),
        "checks": checks,
        "summary": _summary(checks),
    }


def from_audit(
    audit: Mapping[str, Any], title: str = "gradcheck audit"
) -> dict[str, Any]:
    """The report document for an audit (``AuditResult.to_dict()``): one check per
    case, "ok" when its verdict was the expected one."""
    env = dict(audit.get("environment") or {})
    if audit.get("gradcheck_version"):
        env.setdefault("gradcheck", audit["gradcheck_version"])
    if audit.get("seconds") is not None:
        env["audit seconds"] = round(float(audit["seconds"]), 2)
    if audit.get("cpu_seconds") is not None:
        env["audit CPU seconds"] = round(float(audit["cpu_seconds"]), 2)
    for fw, why in (audit.get("skipped") or {}).items():
        env[f"skipped {fw}"] = why
    for key, value in (audit.get("command") or {}).items():
        env[f"audit {key}"] = value
    records = [
        {
            "id": case.get("name", f"case {i + 1}"),
            "outcome": (
                "skipped"
                if case.get("skip")
                else ("ok" if case.get("ok") else "failed")
            ),
            "report": case.get("report"),
            "error": case.get("error") or case.get("skip"),
            "expected": case.get("expected"),
            "examples": _examples(case),
            "code": case.get("code"),
        }
        for i, case in enumerate(audit.get("cases") or [])
    ]
    return build_document(records, env, title)


def _examples(case: Mapping[str, Any]) -> str | None:
    """ "12 generated models: 11 passed, 1 mismatch; counterexample shrunk in 30
    steps; 41.2 s (38.0 s CPU)"."""
    if case.get("examples") is None:
        return None
    if case.get("skip"):
        return f"skipped: {case['skip']}"
    statuses = case.get("statuses") or {}
    parts = ", ".join(f"{n} {s}" for s, n in statuses.items())
    text = f"{case['examples']} generated models" + (f": {parts}" if parts else "")
    if case.get("code"):
        text += f"; counterexample shrunk in {case.get('shrink_steps', 0)} steps"
    if case.get("seconds") is not None:
        text += f"; {float(case['seconds']):.1f} s"
        if case.get("cpu_seconds") is not None:
            text += f" ({float(case['cpu_seconds']):.1f} s CPU)"
    return text


def _check(i: int, rec: Mapping[str, Any]) -> dict[str, Any]:
    report = rec.get("report")
    if report is not None and hasattr(report, "to_dict"):
        report = report.to_dict()
    if report is not None and not isinstance(report, Mapping):
        raise TypeError(
            f"record {i}: 'report' must be a CheckReport or its to_dict(); "
            f"got {type(report).__name__}"
        )
    outcome = rec.get("outcome")
    if outcome is None:
        status = (report or {}).get("status")
        outcome = (
            "ok"
            if report is not None and report.get("passed")
            else "skipped"
            if status == "skipped"
            else "failed"
        )
    if outcome not in OUTCOMES:
        raise ValueError(
            f"record {i}: outcome must be one of {OUTCOMES}; got {outcome!r}"
        )
    ident = rec.get("id") or (report or {}).get("label") or f"check {i + 1}"
    check: dict[str, Any] = {"id": str(ident), "outcome": outcome, "report": report}
    for key in ("error", "expected", "worker", "examples", "code"):
        if rec.get(key) is not None:
            check[key] = str(rec[key])
    return check


def _summary(checks: list[dict[str, Any]]) -> dict[str, Any]:
    by_status = dict.fromkeys(STATUSES, 0)
    by_property: dict[str, int] = {}
    seen: dict[str, set[str]] = {"framework": set(), "dtype": set(), "device": set()}
    seeds: set[int] = set()
    for c in checks:
        r = c["report"]
        if r is None:
            key = "skipped" if c["outcome"] == "skipped" else "error"
            by_status[key] = by_status.get(key, 0) + 1
            continue
        status = str(r.get("status"))
        by_status[status] = by_status.get(status, 0) + 1
        prop = str(r.get("property"))
        by_property[prop] = by_property.get(prop, 0) + 1
        for key, values in seen.items():
            if r.get(key) is not None:
                values.add(str(r[key]))
        if isinstance(r.get("seed"), int):
            seeds.add(r["seed"])
    ok = sum(c["outcome"] == "ok" for c in checks)
    skipped = sum(c["outcome"] == "skipped" for c in checks)
    return {
        "checks": len(checks),
        "ok": ok,
        "skipped": skipped,
        "failed": len(checks) - ok - skipped,
        "by_status": by_status,
        "by_property": by_property,
        "frameworks": sorted(seen["framework"]),
        "dtypes": sorted(seen["dtype"]),
        "devices": sorted(seen["device"]),
        "seeds": sorted(seeds),
        "failed_ids": [c["id"] for c in checks if c["outcome"] == "failed"],
    }
