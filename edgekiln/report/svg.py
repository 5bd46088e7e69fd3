"""Inline SVG charts for report.html: bars, lines and x-y plots, no dependencies.

Each function returns one ``<svg>`` element as a string; every label is HTML-escaped here,
so callers pass raw strings. Sizes are in CSS pixels; text widths are estimated (7 px per
character at 12 px), which is enough to lay out labels without a font engine.

>>> svg = hbar_chart([("onnxruntime", 0.981), ("tflm", 0.979)], hi=1.0, fmt=lambda v: f"{v:.1%}")
>>> svg.startswith("<svg") and "98.1%" in svg
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

__all__ = [
    "PALETTE",
    "RefLine",
    "Series",
    "hbar_chart",
    "line_chart",
    "nice_ticks",
    "vbar_chart",
    "xy_chart",
]

PALETTE = {
    "bar": "#4c78a8",
    "bar_alt": "#9ecae9",
    "bad": "#c44e52",
    "ref1": "#f58518",
    "ref2": "#54a24b",
    "budget": "#c44e52",
    "grid": "#e3e6ea",
    "axis": "#8a9099",
    "text": "#25292e",
    "muted": "#6a717a",
    "baseline": "#6a717a",
}
_CHAR_PX = 7.0  # average glyph width of 12 px sans-serif
_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"'


@dataclass(frozen=True)
class RefLine:
    """A reference value drawn as a dashed line: vertical across a horizontal bar chart (a
    target or a budget), horizontal across an x-y chart (a baseline)."""

    value: float
    label: str
    color: str = PALETTE["ref1"]


@dataclass(frozen=True)
class Series:
    """One line of an x-y chart: ``(x, y)`` points joined in order and each marked with a dot.

    A None ``y`` is a point that was not measured: the line breaks there.
    """

    label: str
    points: Sequence[tuple[float, float | None]]
    color: str = PALETTE["bar"]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi].

    >>> nice_ticks(0.9, 1.0)
    [0.9, 0.92, 0.94, 0.96, 0.98, 1.0]
    """
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _text(x: float, y: float, s: str, anchor: str = "start", size: int = 12, **attrs: str) -> str:
    attrs.setdefault("fill", PALETTE["text"])
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"'
        f"{extra}>{escape(s)}</text>"
    )


def _fit(label: str, max_chars: int) -> str:
    return label if len(label) <= max_chars else label[: max_chars - 1] + "\u2026"


def _legend(items: Sequence[tuple[str, str, bool]], x: float, y: float) -> str:
    """One row of (label, colour, dashed) swatches starting at (x, y)."""
    parts = []
    for label, color, dashed in items:
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        parts.append(
            f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 18:.1f}" y2="{y - 4:.1f}" '
            f'stroke="{color}" stroke-width="2.5"{dash}/>'
        )
        parts.append(_text(x + 24, y, label, size=11, fill_opacity="0.9"))
        x += 24 + _CHAR_PX * 0.95 * len(label) + 18
    return "".join(parts)


def hbar_chart(
    rows: Sequence[tuple[str, float | None]],
    *,
    hi: float | None = None,
    lo: float = 0.0,
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    refs: Sequence[RefLine] = (),
    colors: Sequence[str] | None = None,
    width: int = 760,
    axis_label: str = "",
    max_label_chars: int = 34,
    tick_fmt: Callable[[float], str] | None = None,
) -> str:
    """Horizontal bars, one row per ``(label, value)``; a None value is drawn as "n/a".

    ``lo``/``hi`` fix the axis (default 0 to the largest value or reference line); bars
    start at ``lo``. ``refs`` are dashed vertical lines named in a legend above the plot.
    """
    values = [v for _, v in rows if v is not None] + [r.value for r in refs]
    top_value = hi if hi is not None else max(values, default=1.0) * 1.05 or 1.0
    if top_value <= lo:
        top_value = lo + 1.0
    label_chars = min(max((len(label) for label, _ in rows), default=4), max_label_chars)
    left = 12 + label_chars * _CHAR_PX
    right = 78
    plot_w = width - left - right
    row_h, bar_h = 24, 15
    legend_h = 22 if refs else 4
    top = legend_h + 6
    plot_h = row_h * max(len(rows), 1)
    height = top + plot_h + 34 + (14 if axis_label else 0)

    def x_of(v: float) -> float:
        frac = (min(max(v, lo), top_value) - lo) / (top_value - lo)
        return left + frac * plot_w

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {_FONT} role="img">'
    ]
    if refs:
        out.append(_legend([(r.label, r.color, True) for r in refs], left, 15))
    for tick in nice_ticks(lo, top_value):
        x = x_of(tick)
        out.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
            f'stroke="{PALETTE["grid"]}"/>'
        )
        label = (tick_fmt or fmt)(tick)
        out.append(_text(x, top + plot_h + 16, label, "middle", 11, fill=PALETTE["muted"]))
    out.append(
        f'<line x1="{left:.1f}" y1="{top}" x2="{left:.1f}" y2="{top + plot_h}" '
        f'stroke="{PALETTE["axis"]}"/>'
    )
    for i, (label, value) in enumerate(rows):
        y = top + i * row_h
        mid = y + row_h / 2
        out.append(
            f"<g><title>{escape(label)}: {escape(fmt(value) if value is not None else 'n/a')}"
            "</title>"
        )
        out.append(_text(left - 8, mid + 4, _fit(label, label_chars), "end"))
        if value is None:
            out.append(_text(left + 6, mid + 4, "n/a", fill=PALETTE["muted"]))
        else:
            color = colors[i] if colors else PALETTE["bar"]
            x_end = x_of(value)
            out.append(
                f'<rect x="{left:.1f}" y="{mid - bar_h / 2:.1f}" width="{max(x_end - left, 1):.1f}"'
                f' height="{bar_h}" rx="2" fill="{color}"/>'
            )
            text = fmt(value)
            if x_end - left > len(text) * _CHAR_PX + 12:  # inside the bar, clear of ref lines
                out.append(_text(x_end - 5, mid + 4, text, "end", 11, fill="#ffffff"))
            else:
                out.append(_text(x_end + 5, mid + 4, text, size=11))
        out.append("</g>")
    for ref in refs:
        x = x_of(ref.value)
        out.append(
            f'<line x1="{x:.1f}" y1="{top - 3}" x2="{x:.1f}" y2="{top + plot_h + 3}" '
            f'stroke="{ref.color}" stroke-width="2" stroke-dasharray="5 3">'
            f"<title>{escape(ref.label)}</title></line>"
        )
    if axis_label:
        out.append(
            _text(left + plot_w / 2, height - 4, axis_label, "middle", 11, fill=PALETTE["muted"])
        )
    out.append("</svg>")
    return "".join(out)


def vbar_chart(
    bars: Sequence[tuple[str, float]],
    *,
    width: int = 340,
    height: int = 170,
    color: str = PALETTE["bar"],
    x_label: str = "",
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
) -> str:
    """Vertical bars with their value on top (an LSB histogram: "0", "1", ... -> counts).

    A non-zero bar is at least 2 px tall, so a count of 3 next to 997 stays visible.
    """
    top, bottom, side = 18, 34 if x_label else 22, 10
    plot_h = height - top - bottom
    plot_w = width - 2 * side
    peak = max((v for _, v in bars), default=0) or 1
    slot = plot_w / max(len(bars), 1)
    bar_w = min(slot * 0.7, 48)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {_FONT} role="img">',
        f'<line x1="{side}" y1="{top + plot_h}" x2="{width - side}" y2="{top + plot_h}" '
        f'stroke="{PALETTE["axis"]}"/>',
    ]
    for i, (label, value) in enumerate(bars):
        cx = side + slot * (i + 0.5)
        h = 0.0 if value <= 0 else max(plot_h * value / peak, 2.0)
        y = top + plot_h - h
        out.append(
            f"<g><title>{escape(label)}: {escape(fmt(value))}</title>"
            f'<rect x="{cx - bar_w / 2:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'fill="{color}" rx="1"/>'
        )
        out.append(_text(cx, y - 4, fmt(value), "middle", 10))
        out.append(_text(cx, top + plot_h + 14, label, "middle", 11, fill=PALETTE["muted"]))
        out.append("</g>")
    if x_label:
        out.append(_text(width / 2, height - 4, x_label, "middle", 11, fill=PALETTE["muted"]))
    out.append("</svg>")
    return "".join(out)


def line_chart(
    series: Sequence[tuple[str, Sequence[float], str]],
    *,
    width: int = 760,
    height: int = 220,
    x_label: str = "",
    fmt: Callable[[float], str] = lambda v: f"{v:.3g}",
) -> str:
    """Consecutive line segments: each ``(label, values, colour)`` continues the x axis where
    the previous one ended (float training, then QAT fine-tuning, on one timeline)."""
    values = [v for _, vs, _ in series for v in vs]
    n = sum(len(vs) for _, vs, _ in series)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    ticks = nice_ticks(lo, hi, 4)
    if len(ticks) > 1:  # widen to whole steps so no point sits above the top grid line
        step = ticks[1] - ticks[0]
        if ticks[0] > lo + 1e-12:
            ticks.insert(0, round(ticks[0] - step, 12))
        if ticks[-1] < hi - 1e-12:
            ticks.append(round(ticks[-1] + step, 12))
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    left, right, top, bottom = 56, 16, 28, 34 if x_label else 22
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (plot_w * i / max(n - 1, 1))
        return x, top + plot_h * (1 - (v - lo) / (hi - lo))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {_FONT} role="img">',
        _legend([(label, color, False) for label, _, color in series], left, 15),
    ]
    for tick in ticks:
        _, y = xy(0, tick)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
            f'stroke="{PALETTE["grid"]}"/>'
        )
        out.append(_text(left - 6, y + 4, fmt(tick), "end", 11, fill=PALETTE["muted"]))
    start = 0
    for label, vs, color in series:
        if vs:
            pts = [xy(i, v) for i, v in zip(range(start, start + len(vs)), vs, strict=True)]
            if start:  # join to the previous segment's last point
                pts.insert(0, xy(start - 1, _last_value(series, label)))
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2">'
                f"<title>{escape(label)}</title></polyline>"
            )
            for k, (x, y) in enumerate(pts[-len(vs) :] if n <= 60 else ()):
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>')
                out.append(_text(x, top + plot_h + 14, str(k + 1), "middle", 10, fill=color))
        start += len(vs)
    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        f'stroke="{PALETTE["axis"]}"/>'
    )
    if x_label:
        out.append(
            _text(left + plot_w / 2, height - 4, x_label, "middle", 11, fill=PALETTE["muted"])
        )
    out.append("</svg>")
    return "".join(out)


def _last_value(series: Sequence[tuple[str, Sequence[float], str]], label: str) -> float:
    """The last value of the non-empty series before the one named ``label``."""
    previous: Sequence[float] = ()
    for name, vs, _ in series:
        if name == label:
            break
        if vs:
            previous = vs
    return previous[-1] if previous else 0.0


def _covering_ticks(lo: float, hi: float, count: int) -> list[float]:
    """``nice_ticks`` widened by whole steps so that the first is <= lo and the last >= hi."""
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    ticks = nice_ticks(lo, hi, count)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    if ticks[0] > lo + 1e-12:
        ticks.insert(0, round(ticks[0] - step, 12))
    if ticks[-1] < hi - 1e-12:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def xy_chart(
    series: Sequence[Series],
    *,
    x_range: tuple[float, float] | None = None,
    refs: Sequence[RefLine] = (),
    width: int = 760,
    height: int = 250,
    x_label: str = "",
    y_label: str = "",
    x_fmt: Callable[[float], str] = lambda v: f"{v:g}",
    y_fmt: Callable[[float], str] = lambda v: f"{v:.3g}",
    point_labels: bool = False,
) -> str:
    """Lines over a numeric x axis, every point marked; ``refs`` are dashed horizontal lines.

    ``x_range`` fixes the x axis (default: the points' range); the y axis covers every point
    and reference line, widened to whole tick steps (it need not start at 0). ``x_fmt`` and
    ``y_fmt`` format tick labels and the tooltips; ``point_labels`` writes each point's
    ``y_fmt`` value above it (for one series with a few points). A legend above the plot
    names the series (solid) and the reference lines (dashed).

    >>> svg = xy_chart([Series("accuracy", [(0.25, 0.97), (0.5, 0.95)])], x_range=(0, 1),
    ...                refs=[RefLine(0.98, "float model")], y_fmt=lambda v: f"{100 * v:.0f}%")
    >>> svg.count("<circle"), "stroke-dasharray" in svg, "float model" in svg
    (2, True, True)
    """
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if y is not None] + [r.value for r in refs]
    x_lo, x_hi = x_range if x_range is not None else (min(xs, default=0.0), max(xs, default=1.0))
    if not x_hi > x_lo:
        x_lo, x_hi = x_lo - 0.5, x_lo + 0.5
    y_ticks = _covering_ticks(min(ys, default=0.0), max(ys, default=1.0), 4)
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 5) if x_lo - 1e-12 <= t <= x_hi + 1e-12]

    tick_chars = max((len(y_fmt(t)) for t in y_ticks), default=3)
    left = 14 + tick_chars * _CHAR_PX + (18 if y_label else 0)
    right, top = 22, 34
    bottom = 24 + (16 if x_label else 0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return top + plot_h * (1 - (y - y_lo) / (y_hi - y_lo))

    legend = [(s.label, s.color, False) for s in series] + [(r.label, r.color, True) for r in refs]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {_FONT} role="img">',
        _legend(legend, left, 15),
    ]
    for tick in y_ticks:
        y = py(tick)
        out.append(
            f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{left + plot_w:.1f}" y2="{y:.1f}" '
            f'stroke="{PALETTE["grid"]}"/>'
        )
        out.append(_text(left - 6, y + 4, y_fmt(tick), "end", 11, fill=PALETTE["muted"]))
    for tick in x_ticks:
        x = px(tick)
        out.append(
            f'<line x1="{x:.1f}" y1="{top + plot_h:.1f}" x2="{x:.1f}" y2="{top + plot_h + 4:.1f}" '
            f'stroke="{PALETTE["axis"]}"/>'
        )
        out.append(_text(x, top + plot_h + 17, x_fmt(tick), "middle", 11, fill=PALETTE["muted"]))
    out.append(
        f'<path d="M{left:.1f},{top:.1f} V{top + plot_h:.1f} H{left + plot_w:.1f}" fill="none" '
        f'stroke="{PALETTE["axis"]}"/>'
    )
    for ref in refs:
        ref_y = py(ref.value)
        out.append(
            f'<line x1="{left:.1f}" y1="{ref_y:.1f}" x2="{left + plot_w:.1f}" y2="{ref_y:.1f}" '
            f'stroke="{ref.color}" stroke-width="1.5" stroke-dasharray="5 3">'
            f"<title>{escape(ref.label)}: {escape(y_fmt(ref.value))}</title></line>"
        )
    for s in series:
        runs: list[list[tuple[float, float]]] = [[]]
        for x, value in s.points:
            if value is None:
                runs.append([])
            else:
                runs[-1].append((px(x), py(value)))
        for run in runs:
            if len(run) > 1:
                path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in run)
                out.append(
                    f'<polyline points="{path}" fill="none" stroke="{s.color}" '
                    'stroke-width="2" stroke-linejoin="round"/>'
                )
        for x, value in s.points:
            if value is None:
                continue
            tip = f"{s.label} at {x_fmt(x)}: {y_fmt(value)}"
            out.append(
                f"<g><title>{escape(tip)}</title>"
                f'<circle cx="{px(x):.1f}" cy="{py(value):.1f}" r="3.5" fill="{s.color}" '
                'stroke="#ffffff" stroke-width="1"/></g>'
            )
            if point_labels:
                out.append(_text(px(x), py(value) - 8, y_fmt(value), "middle", 10, fill=s.color))
    if x_label:
        out.append(
            _text(left + plot_w / 2, height - 4, x_label, "middle", 11, fill=PALETTE["muted"])
        )
    if y_label:
        cx, cy = 12, top + plot_h / 2
        out.append(
            _text(
                cx,
                cy,
                y_label,
                "middle",
                11,
                fill=PALETTE["muted"],
                transform=f"rotate(-90 {cx:.1f} {cy:.1f})",
            )
        )
    out.append("</svg>")
    return "".join(out)
