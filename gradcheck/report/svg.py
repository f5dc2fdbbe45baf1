"""Inline SVG charts for the HTML report: small pure functions, data in, markup out.

No JavaScript, no fonts or images fetched from anywhere: every chart is one ``<svg>``
element a browser draws offline. All text that reaches the markup goes through
:func:`markupsafe.escape`; the functions return :class:`markupsafe.Markup` so the
autoescaping template embeds them as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

__all__ = ["Bar", "fmt", "svg_bars", "svg_curve", "svg_heatmap"]

FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"
CHAR_W = 6.8  # width of one character at font-size 11, monospace
GOOD, BAD, NEUTRAL, INK, GRID = "#2da44e", "#cf222e", "#6e7ba8", "#24292f", "#d0d7de"


@dataclass(frozen=True)
class Bar:
    """One row of :func:`svg_bars`: a value and, optionally, the limit it must stay
    under (drawn as a tick; the bar turns red past it)."""

    label: str
    value: float | None
    limit: float | None = None
    note: str = ""


def fmt(x: object, digits: int = 3) -> str:
    """A number as a short string: 3 significant digits, '—' for missing."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)  # "inf"/"nan" as the JSON carries them
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _text(x: float, y: float, s: str, *, anchor: str = "start", **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>'
        f"{escape(s)}</text>"
    )


def _open(width: float, height: float, label: str) -> str:
    return (
        f'<svg width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="{escape(label)}" font-family="{FONT}" font-size="11" '
        f'fill="{INK}">'
    )


def _finite(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


class _Scale:
    """Maps [lo, hi] (log10 when ``log``) onto pixels [a, b]."""

    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool):
        self.log = log
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi <= lo:
            lo, hi = lo - 1, hi + 1
        self.lo, self.hi, self.a, self.b = lo, hi, a, b

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(v) if v > 0 else self.lo
        t = (v - self.lo) / (self.hi - self.lo)
        return self.a + min(max(t, 0.0), 1.0) * (self.b - self.a)

    def ticks(self) -> list[float]:
        if self.log:
            lo, hi = math.floor(self.lo), math.ceil(self.hi)
            stride = max(1, math.ceil((hi - lo) / 6))
            return [
                10.0**e for e in range(lo, hi + 1, stride) if self.lo <= e <= self.hi
            ]
        step = _nice_step((self.hi - self.lo) / 4)
        first = math.ceil(self.lo / step - 1e-9)
        last = math.floor(self.hi / step + 1e-9)
        return [k * step for k in range(first, last + 1)]


def _nice_step(raw: float) -> float:
    """1, 2, 2.5 or 5 times a power of ten, at least ``raw``."""
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))


def _log_range(values: Sequence[float]) -> tuple[float, float]:
    pos = [v for v in values if v > 0]
    if not pos:
        return 1e-1, 1e1
    lo, hi = min(pos), max(pos)
    return 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi) + 1e-9)


def _tick_labels(ticks: Sequence[float]) -> list[str]:
    """The shortest labels that still tell the ticks apart."""
    for digits in range(3, 16):
        labels = [fmt(t, digits) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return [repr(t) for t in ticks]


def svg_bars(bars: Sequence[Bar], *, title: str, log: bool = False) -> Markup:
    """Horizontal bars, one per row, with each row's limit as a dark tick.

    ``log``: a log10 axis (errors and tolerances span many decades); zero values
    sit at the axis start. Rows without a limit are drawn in a neutral colour.
    """
    if not bars:
        return Markup("")
    label_w = min(34, max(len(b.label) for b in bars)) * CHAR_W + 12
    note_w = max((len(b.note) for b in bars), default=0) * CHAR_W
    plot_w = 360.0
    row_h, top = 22.0, 8.0
    width = label_w + plot_w + max(note_w, 60) + 24
    height = top + row_h * len(bars) + 24
    values = [v for b in bars for v in (_finite(b.value), _finite(b.limit)) if v]
    if log:
        lo, hi = _log_range(values)
    else:
        top_value = max([abs(v) for v in values] or [1.0])
        step = _nice_step(top_value / 5)
        lo, hi = 0.0, math.ceil(top_value / step - 1e-9) * step
    x = _Scale(lo, hi, label_w, label_w + plot_w, log)
    out = [_open(width, height, title), f"<title>{escape(title)}</title>"]
    bottom = top + row_h * len(bars)
    for t, lab in zip(x.ticks(), _tick_labels(x.ticks()), strict=True):
        px = x(t)
        out.append(
            f'<line x1="{px:.1f}" y1="{top:.1f}" x2="{px:.1f}" y2="{bottom:.1f}" '
            f'stroke="{GRID}" stroke-width="1"/>'
        )
        out.append(_text(px, bottom + 14, lab, anchor="middle", fill="#57606a"))
    for i, b in enumerate(bars):
        y = top + i * row_h
        v, lim = _finite(b.value), _finite(b.limit)
        colour = NEUTRAL if lim is None else (BAD if (v or 0) > lim else GOOD)
        tip = f"{b.label}: {fmt(b.value, 4)}"
        if b.limit is not None:
            tip += f" (limit {fmt(b.limit, 4)})"
        out.append(f"<g><title>{escape(tip)}</title>")
        out.append(_text(label_w - 8, y + 15, _clip(b.label, 34), anchor="end"))
        if v is not None:
            w = max(x(abs(v)) - label_w, 1.0)
            out.append(
                f'<rect x="{label_w:.1f}" y="{y + 4:.1f}" width="{w:.1f}" '
                f'height="{row_h - 8:.1f}" fill="{colour}" rx="2"/>'
            )
        if lim is not None:
            px = x(lim)
            out.append(
                f'<line x1="{px:.1f}" y1="{y + 1:.1f}" x2="{px:.1f}" '
                f'y2="{y + row_h - 1:.1f}" stroke="{INK}" stroke-width="2"/>'
            )
        note = b.note or fmt(b.value)
        out.append(_text(label_w + plot_w + 8, y + 15, note, fill="#57606a"))
        out.append("</g>")
    out.append(
        f'<line x1="{label_w:.1f}" y1="{top:.1f}" x2="{label_w:.1f}" '
        f'y2="{bottom:.1f}" stroke="{INK}" stroke-width="1"/>'
    )
    out.append("</svg>")
    return Markup("".join(out))


def _blend(t: float) -> str:
    """White-blue ramp, t in [0, 1]."""
    lo, hi = (0xEE, 0xF3, 0xFB), (0x1F, 0x4E, 0x9C)
    r, g, b = (round(a + (c - a) * t) for a, c in zip(lo, hi, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def svg_heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float | None]],
    *,
    title: str,
    cell_text: Sequence[Sequence[str]] | None = None,
    absent: Sequence[Sequence[bool]] | None = None,
    flagged: Sequence[Sequence[bool]] | None = None,
    tips: Sequence[Sequence[str]] | None = None,
    uid: str = "gc",
) -> Markup:
    """A rows x columns matrix of non-negative values on a log colour ramp.

    ``absent[r][c]``: the cell has no value by construction (drawn hatched grey);
    ``flagged[r][c]``: drawn with a red outline; ``cell_text``: one short line per
    cell under its value; ``tips``: hover text; ``uid``: prefix of the ids the chart
    defines, unique per document.
    """
    if not rows or not cols:
        return Markup("")
    cell_w, cell_h = 118.0, 38.0
    label_w = min(34, max(len(r) for r in rows)) * CHAR_W + 14
    head_h = 30.0
    height = head_h + cell_h * len(rows) + 44
    pos = [
        v
        for row in values
        for v in (_finite(x) for x in row)
        if v is not None and v > 0
    ]
    lo, hi = (min(pos), max(pos)) if pos else (1.0, 1.0)
    llo, lhi = math.log10(lo), math.log10(hi)
    legend = f"{fmt(lo)} … {fmt(hi)} (log)" if pos else "all zero"
    any_flag = bool(flagged and any(any(row) for row in flagged))
    legend_w = 118 + (len(legend) + (3 + 4 + 12 if any_flag else 0)) * CHAR_W + 36
    width = label_w + max(cell_w * len(cols), legend_w) + 12

    def shade(v: float) -> float:
        if v <= 0:
            return 0.0
        return 1.0 if lhi == llo else 0.12 + 0.88 * (math.log10(v) - llo) / (lhi - llo)

    out = [
        _open(width, height, title),
        f"<title>{escape(title)}</title>",
        f'<defs><pattern id="{escape(uid)}-hatch" width="6" height="6" '
        'patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        '<rect width="6" height="6" fill="#f6f8fa"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{GRID}" stroke-width="2"/>'
        "</pattern></defs>",
    ]
    for c, name in enumerate(cols):
        cx = label_w + c * cell_w + cell_w / 2
        out.append(
            f"<g><title>{escape(name)}</title>"
            + _text(
                cx, head_h - 10, _clip(name, 17), anchor="middle", font_weight="bold"
            )
            + "</g>"
        )
    for r, name in enumerate(rows):
        y = head_h + r * cell_h
        out.append(
            f"<g><title>{escape(name)}</title>"
            + _text(label_w - 8, y + cell_h / 2 + 4, _clip(name, 34), anchor="end")
            + "</g>"
        )
        for c in range(len(cols)):
            x = label_w + c * cell_w
            v = _finite(values[r][c]) if c < len(values[r]) else None
            missing = bool(absent and absent[r][c])
            flag = bool(flagged and flagged[r][c])
            tip = tips[r][c] if tips else f"{name} / {cols[c]}: {fmt(v, 4)}"
            if missing:
                fill, ink = f"url(#{escape(uid)}-hatch)", "#8c959f"
            else:
                t = shade(v or 0.0)
                fill, ink = _blend(t), ("#ffffff" if t > 0.55 else INK)
            stroke = (
                f'stroke="{BAD}" stroke-width="3"'
                if flag
                else 'stroke="#ffffff" stroke-width="1"'
            )
            out.append(f"<g><title>{escape(tip)}</title>")
            out.append(
                f'<rect x="{x + 1.5:.1f}" y="{y + 1.5:.1f}" width="{cell_w - 3:.1f}" '
                f'height="{cell_h - 3:.1f}" fill="{fill}" {stroke} rx="3"/>'
            )
            main = "not reached" if missing else fmt(v)
            sub = cell_text[r][c] if cell_text else ""
            cx = x + cell_w / 2
            if sub:
                out.append(_text(cx, y + 16, main, anchor="middle", fill=ink))
                out.append(
                    _text(cx, y + 30, sub, anchor="middle", fill=ink, font_size="10")
                )
            else:
                out.append(
                    _text(cx, y + cell_h / 2 + 4, main, anchor="middle", fill=ink)
                )
            out.append("</g>")
    # legend: five swatches of the ramp, min to max
    ly = head_h + cell_h * len(rows) + 14
    out.append(_text(label_w - 8, ly + 10, "scale", anchor="end", fill="#57606a"))
    for i in range(5):
        out.append(
            f'<rect x="{label_w + i * 22:.1f}" y="{ly:.1f}" width="22" height="12" '
            f'fill="{_blend(0.12 + 0.22 * i)}"/>'
        )
    out.append(_text(label_w + 118, ly + 10, legend, fill="#57606a"))
    if any_flag:
        fx = label_w + 118 + (len(legend) + 3) * CHAR_W
        out.append(
            f'<rect x="{fx:.1f}" y="{ly:.1f}" width="22" height="12" fill="none" '
            f'stroke="{BAD}" stroke-width="3"/>'
        )
        out.append(_text(fx + 28, ly + 10, "wrong weight", fill=BAD))
    out.append("</svg>")
    return Markup("".join(out))


def svg_curve(
    points: Sequence[tuple[float, float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = True,
) -> Markup:
    """A line through (x, y) points on a log10 x axis; log10 y when ``log_y``.

    Points that cannot be drawn (non-finite, or non-positive on a log axis) are
    left out; no points left, no chart.
    """
    pts = []
    for px, py in points:
        fx, fy = _finite(px), _finite(py)
        if fx is None or fy is None or fx <= 0 or (log_y and fy <= 0):
            continue
        pts.append((fx, fy))
    if not pts:
        return Markup("")
    pts.sort()
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if log_y:
        ylo, yhi = _log_range(ys)
    else:
        span = (max(ys) - min(ys)) or abs(ys[0]) * 1e-12 or 1.0
        ylo, yhi = min(ys) - span * 0.1, max(ys) + span * 0.1
    # the y tick labels decide the left margin (they do not depend on pixels)
    ylabels = _tick_labels(_Scale(ylo, yhi, 0, 1, log_y).ticks())
    width, height = 560.0, 250.0
    left = max((len(lab) for lab in ylabels), default=4) * CHAR_W + 34
    right, top, bottom = 16.0, 14.0, 46.0
    x = _Scale(*_log_range(xs), left, width - right, True)
    y = _Scale(ylo, yhi, height - bottom, top, log_y)
    out = [_open(width, height, title), f"<title>{escape(title)}</title>"]
    for t, lab in zip(x.ticks(), _tick_labels(x.ticks()), strict=True):
        px = x(t)
        out.append(
            f'<line x1="{px:.1f}" y1="{top:.1f}" x2="{px:.1f}" '
            f'y2="{height - bottom:.1f}" stroke="{GRID}"/>'
        )
        out.append(
            _text(px, height - bottom + 14, lab, anchor="middle", fill="#57606a")
        )
    for t, lab in zip(y.ticks(), ylabels, strict=True):
        py = y(t)
        out.append(
            f'<line x1="{left:.1f}" y1="{py:.1f}" x2="{width - right:.1f}" '
            f'y2="{py:.1f}" stroke="{GRID}"/>'
        )
        out.append(_text(left - 6, py + 4, lab, anchor="end", fill="#57606a"))
    out.append(
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{width - left - right:.1f}" '
        f'height="{height - top - bottom:.1f}" fill="none" stroke="{INK}"/>'
    )
    path = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts)
    out.append(
        f'<polyline points="{path}" fill="none" stroke="#0969da" stroke-width="2"/>'
    )
    for a, b in pts:
        out.append(
            f"<g><title>{escape(f'{xlabel} {fmt(a, 4)}: {ylabel} {fmt(b, 12)}')}</title>"
            f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="4" fill="#0969da"/></g>'
        )
    out.append(_text((left + width - right) / 2, height - 12, xlabel, anchor="middle"))
    out.append(
        f'<text x="14" y="{(top + height - bottom) / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2:.1f})">'
        f"{escape(ylabel)}</text>"
    )
    out.append("</svg>")
    return Markup("".join(out))
