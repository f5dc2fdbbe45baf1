"""Document → one self-contained HTML file (autoescaped Jinja2, inline CSS and SVG)."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

from gradcheck._io import atomic_write_text
from gradcheck.errors import FrameworkNotInstalledError

__all__ = ["render_html", "write_html"]

INSTALL_HINT = 'pip install "gradcheck[report]"'
#: fewer checks than this: every check is shown unfolded, passed ones too
_UNFOLD_ALL = 20


def _jinja() -> Any:
    try:
        import jinja2  # noqa: F401
        import markupsafe  # noqa: F401
    except ImportError as exc:
        raise FrameworkNotInstalledError(
            f"gradcheck's HTML report needs Jinja2, which is not installed: "
            f"{INSTALL_HINT}"
        ) from exc
    return _template()


@functools.cache
def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gradcheck.report", "templates"),
        autoescape=jinja2.select_autoescape(default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    from gradcheck.report.svg import fmt

    env.filters["num"] = fmt
    return env.get_template("report.html")


def render_html(data: dict[str, Any]) -> str:
    """The HTML page for a report document (see :mod:`gradcheck.report.document`).

    One file, nothing fetched: CSS is inline and charts are inline SVG. Every text
    that comes from the data (test ids, tensor names, notes) is escaped."""
    template = _jinja()
    checks = [
        _check_view(i, c, len(data["checks"])) for i, c in enumerate(data["checks"])
    ]
    summary = data.get("summary") or {}
    env = {str(k): v for k, v in (data.get("environment") or {}).items()}
    for key, label in (
        ("frameworks", "checked frameworks"),
        ("dtypes", "checked dtypes"),
        ("devices", "checked devices"),
        ("seeds", "seeds used"),
    ):
        if summary.get(key):
            env.setdefault(label, ", ".join(map(str, summary[key])))
    return template.render(
        title=data.get("title") or "gradcheck report",
        generated=data.get("generated", ""),
        version=data.get("gradcheck_version", ""),
        environment=env,
        summary=summary,
        statuses={k: v for k, v in (summary.get("by_status") or {}).items() if v},
        checks=checks,
        models=data.get("models") or [],
    )


def write_html(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Render ``data`` and write it to ``path`` atomically (a temporary file in the
    same folder, then ``os.replace``; mode 0644). Returns the path."""
    # render first: a template error leaves no file
    return atomic_write_text(path, render_html(data))


# --------------------------------------------------------------------- views
def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _check_view(i: int, check: dict[str, Any], total: int) -> dict[str, Any]:
    r = check.get("report") or None
    if r:
        status = r.get("status", "unknown")
    else:
        status = "skipped" if check["outcome"] == "skipped" else "error"
    err, tol = (_num(r.get("error")), _num(r.get("tolerance"))) if r else (None, None)
    ratio = err / tol if err is not None and tol else None
    loc = (r or {}).get("location")
    if loc and loc.get("index") is not None:
        loc = {**loc, "where": "[" + ", ".join(map(str, loc["index"])) + "]"}
    elif loc:
        loc = {**loc, "where": ""}
    open_ = check["outcome"] == "failed" or (
        status not in ("passed", "skipped") or total <= _UNFOLD_ALL
    )
    return {
        "anchor": f"check-{i + 1}",
        "id": check["id"],
        "outcome": check["outcome"],
        "expected": check.get("expected"),
        "worker": check.get("worker"),
        "error_text": check.get("error"),
        "code": check.get("code"),
        "examples": check.get("examples"),
        "status": status,
        "r": r,
        "ratio": ratio,
        "location": loc,
        "open": open_,
        "figures": _figures(r, f"gc{i + 1}") if r else [],
        "tables": _tables(r) if r else [],
    }


def _tables(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Property-specific tables: check_variants' (variant, tensor) rows and
    check_distributed's ranks."""
    out = []
    tensors = r.get("tensors") or []
    if r.get("property") in ("variants", "devices") and tensors:
        rows = []
        for t in tensors:
            variant, _, name = str(t.get("name", "")).partition("/")
            rows.append(
                {
                    "cls": f"st-{t.get('status')}",
                    "cells": [
                        variant,
                        name,
                        str(t.get("dtype")),
                        str(t.get("device")),
                        _cell(t.get("error")),
                        _cell(t.get("tolerance")),
                        str(t.get("status")),
                    ],
                }
            )
        out.append(
            {
                "title": "Variants" if r.get("property") == "variants" else "Devices",
                "columns": [
                    "variant",
                    "tensor",
                    "precision",
                    "device",
                    "‖g_variant − g_eager‖",
                    "tolerance",
                    "status",
                ],
                "rows": rows,
            }
        )
    if r.get("property") == "distributed":
        cost = r.get("cost") or {}
        world = int(cost.get("world_size") or 0)
        rows = [
            {
                "cls": "",
                "cells": [
                    f"rank {k}",
                    _cell(cost.get(f"rank_seconds[{k}]")),
                ],
            }
            for k in range(world)
        ]
        out.append(
            {
                "title": f"Ranks (world size {world}, wrap {r.get('mode')}, start "
                f"{_seconds(cost.get('spawn_seconds'))}, check "
                f"{_seconds(cost.get('seconds'))})",
                "columns": ["rank", "step seconds"],
                "rows": rows,
            }
        )
    return out


def _cell(x: Any) -> float | str:
    v = _num(x)
    return "—" if v is None else v


def _seconds(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.2f} s"


def _figures(r: dict[str, Any], uid: str) -> list[dict[str, Any]]:
    figs = [f for f in (_tensor_figure(r), _flow_figure(r, uid), _steps_figure(r)) if f]
    return figs


def _tensor_figure(r: dict[str, Any]) -> dict[str, Any] | None:
    from gradcheck.report.svg import Bar, fmt, svg_bars

    tensors = r.get("tensors") or []
    if not tensors:
        return None
    judged = [
        t for t in tensors if _num(t.get("error")) is not None and t.get("tolerance")
    ]
    if judged:
        bars = [
            Bar(
                t["name"],
                _num(t["error"]),
                _num(t["tolerance"]),
                f"{fmt(t['error'])} / {fmt(t['tolerance'])}",
            )
            for t in judged
        ]
        return {
            "title": "Error vs tolerance per tensor",
            "caption": "Bar: |error| of the tensor's worst element; tick: its "
            "tolerance. Red bars are past it. Log scale.",
            "svg": svg_bars(bars, title="error vs tolerance per tensor", log=True),
        }
    bars = []
    for t in tensors:
        note = f"‖g‖ {fmt(t.get('grad_norm'))}"
        if _num(t.get("analytical")) is not None:
            note += f"  ⟨g,d⟩ {fmt(t['analytical'])}"
        if t.get("connected") is False:
            note += "  (not connected)"
        bars.append(Bar(t["name"], _num(t.get("grad_norm")), None, note))
    return {
        "title": "Gradient norm per tensor",
        "caption": "‖g‖: norm of the analytical gradient of each tensor; ⟨g,d⟩: its "
        "contribution to the directional derivative that was checked.",
        "svg": svg_bars(bars, title="gradient norm per tensor"),
    }


def _flow_figure(r: dict[str, Any], uid: str) -> dict[str, Any] | None:
    from gradcheck.report.svg import fmt, svg_heatmap

    flow = r.get("flow")
    if not flow or not flow.get("tensors") or not flow.get("losses"):
        return None
    tensors, losses = flow["tensors"], flow["losses"]
    weights = flow.get("weights") or [None] * len(losses)
    eff = flow.get("effective_weights") or [[None] * len(losses) for _ in tensors]
    expected = flow.get("expected") or None  # the locality check's architecture
    totals = flow.get("total_norms") or [None] * len(tensors)
    cols = [f"{loss} (w={fmt(w)})" for loss, w in zip(losses, weights, strict=True)]
    cols.append("total")
    sizes = {
        tr.get("name"): math.prod(tr.get("shape") or ())
        for tr in r.get("tensors") or []
    }
    values, text, absent, flagged, tips = [], [], [], [], []
    for t, name in enumerate(tensors):
        v_row, t_row, a_row, f_row, tip_row = [], [], [], [], []
        # effective weights are a least-squares fit: with fewer elements than
        # losses reaching the tensor (a 1-element bias, four losses) they are not
        # determined; and where the check passed, deviations are within tolerance
        fitted = sizes.get(name, math.inf) >= sum(map(bool, flow["reaches"][t]))
        for i, loss in enumerate(losses):
            norm, reach = flow["norms"][t][i], flow["reaches"][t][i]
            e, w = _num(eff[t][i]), _num(weights[i])
            if not fitted:
                e = None
            wrong = bool(
                not r.get("passed")
                and reach
                and e is not None
                and w is not None
                and abs(e - w) > 1e-3 * abs(w)
            )
            off_plan = expected is not None and bool(expected[t][i]) != bool(reach)
            wrong = wrong or off_plan
            v_row.append(norm)
            a_row.append(not reach)
            f_row.append(wrong)
            shown = "≈0" if e is not None and abs(e) < 1e-9 else fmt(e)
            if not fitted:
                shown = "n/a"
            t_row.append("" if not reach else f"eff. w {shown}")
            tip = f"{name} / {loss}: ‖w·∇{loss}‖ = {fmt(norm, 4)}"
            tip += f", effective weight {fmt(e, 4)}" if reach else ", not reached"
            if off_plan:
                tip += (
                    "; the architecture says it should NOT reach it (a leak)"
                    if reach
                    else "; the architecture says it SHOULD reach it (a cut)"
                )
            elif wrong:
                tip += f" instead of {fmt(w)}"
            tip_row.append(tip)
        v_row.append(totals[t])
        a_row.append(False)
        f_row.append(False)
        t_row.append("‖∇total‖")
        tip_row.append(f"{name}: ‖∇total‖ = {fmt(totals[t], 4)}")
        for row, new in zip(
            (values, text, absent, flagged, tips),
            (v_row, t_row, a_row, f_row, tip_row),
            strict=True,
        ):
            row.append(new)
    return {
        "title": "Gradient-flow matrix",
        "caption": "Each cell: ‖wᵢ·∂lossᵢ/∂tensor‖ and the effective weight the loss "
        "has in ∇total for that tensor (equal to wᵢ when the total is right). "
        "Hatched: the loss does not reach the tensor. Red outline: wrong weight, or "
        "(locality checks) reach that differs from the architecture.",
        "svg": svg_heatmap(
            tensors,
            cols,
            values,
            title="gradient-flow matrix",
            cell_text=text,
            absent=absent,
            flagged=flagged,
            tips=tips,
            uid=uid,
        ),
    }


def _steps_figure(r: dict[str, Any]) -> dict[str, Any] | None:
    from gradcheck.report.svg import svg_curve

    steps = r.get("steps") or []
    devs = [
        (s.get("step"), s.get("deviation"))
        for s in steps
        if (_num(s.get("deviation")) or 0) > 0
    ]
    if len(devs) >= 2:
        return {
            "title": "Finite-difference error vs step",
            "caption": "|estimate − final estimate| at each step (log-log): the "
            "truncation error falls with the step until rounding takes over.",
            "svg": svg_curve(
                devs, title="error vs step", xlabel="step", ylabel="|deviation|"
            ),
        }
    pts = [(s.get("step"), s.get("estimate")) for s in steps]
    if not any(_num(y) is not None for _, y in pts):
        return None
    return {
        "title": "Finite-difference estimate vs step",
        "caption": "The finite-difference estimate at each step (log step axis); "
        "a flat curve means the estimate does not depend on the step.",
        "svg": svg_curve(
            pts, title="estimate vs step", xlabel="step", ylabel="estimate", log_y=False
        ),
    }
