"""The report's "what sparsity buys" sections: dense against sparse, and the sweep.

The sweep is drawn as line plots over the sparsity target (0 to 100%): the fake-quant model's
accuracy against the float model's (a dashed line), and, when the report holds the unpruned
model's figures (``sparsity.before_after.dense``), each point's size, MACs and latency as a
ratio to them (the dense model is the dashed line at 1x). A table under the charts gives the
values themselves.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from edgekiln.report.svg import PALETTE, RefLine, Series, xy_chart

_METRICS = (
    ("tflite_bytes", "TFLite size", lambda v: f"{v / 1024:.1f} KiB"),
    ("gzip_bytes", "gzip size", lambda v: f"{v / 1024:.1f} KiB"),
    ("macs", "MACs", lambda v: f"{v / 1e6:.2f} M"),
    ("estimated_ms", "estimated latency", lambda v: f"{v:.1f} ms"),
)
# One colour per metric line of the ratio chart: the two sizes in two blues.
_METRIC_COLORS = {
    "tflite_bytes": PALETTE["bar"],
    "gzip_bytes": PALETTE["bar_alt"],
    "macs": PALETTE["ref1"],
    "estimated_ms": PALETTE["ref2"],
}


def sparsity_sections(report: Mapping[str, Any]) -> str:
    """HTML for ``sparsity.before_after`` and ``sweep`` (empty when the run has neither).

    >>> point = {"sparsity": 0.5, "weight_sparsity": 0.49, "accuracy": 0.97,
    ...          "tflite_bytes": 20_480, "gzip_bytes": 9_216, "macs": 1_000_000,
    ...          "estimated_ms": 4.2}
    >>> html = sparsity_sections({"training": {"float_accuracy": 0.98}, "sweep": [point]})
    >>> html.count("<svg"), "float model (dense)" in html, "<td class=num>9.0 KiB</td>" in html
    (1, True, True)
    """
    parts = []
    before_after = (report.get("sparsity") or {}).get("before_after")
    if before_after:
        parts.append(_before_after(before_after))
    sweep = report.get("sweep") or []
    if sweep:
        float_accuracy = (report.get("training") or {}).get("float_accuracy")
        dense = (before_after or {}).get("dense") or {}
        parts.append(_sweep(sweep, float_accuracy, dense))
    return "\n".join(parts)


def _before_after(section: Mapping[str, Any]) -> str:
    dense, sparse = section.get("dense") or {}, section.get("sparse") or {}
    rows = []
    for key, label, fmt in _METRICS:
        a, b = dense.get(key), sparse.get(key)
        if a is None or b is None:
            continue
        ratio = f"{b / a:.2f}x" if a else "-"
        rows.append(
            f"<tr><td>{label}</td><td class=num>{html.escape(fmt(a))}</td>"
            f"<td class=num>{html.escape(fmt(b))}</td><td class=num>{ratio}</td></tr>"
        )
    board = html.escape(str(section.get("board", "")))
    return (
        "<h3>What sparsity buys</h3>"
        f"<p>The unpruned model against this one, written as int8 TFLite; latency is the "
        f"simulator's estimate on {board} ({html.escape(str(section.get('kernels', '')))}).</p>"
        "<table><thead><tr><th>metric</th><th class=num>dense</th><th class=num>sparse</th>"
        "<th class=num>ratio</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _pct(v: float) -> str:
    return f"{100 * v:g}%"


def _sweep(
    points: list[Mapping[str, Any]],
    float_accuracy: float | None,
    dense: Mapping[str, Any],
) -> str:
    points = sorted(points, key=lambda p: float(p["sparsity"]))
    x_label = "sparsity target (% of conv and linear weights pruned)"
    parts = [
        "<h3>Sparsity sweep</h3>",
        "<p>Each level fine-tuned from the same float model with the run's recipe.</p>",
        _accuracy_plot(points, float_accuracy, x_label),
        _ratio_plot(points, dense, x_label),
        _sweep_table(points),
    ]
    return "\n".join(part for part in parts if part)


def _accuracy_plot(
    points: list[Mapping[str, Any]], float_accuracy: float | None, x_label: str
) -> str:
    acc = [(float(p["sparsity"]), p.get("accuracy")) for p in points]
    if all(v is None for _, v in acc):
        return '<h4>accuracy</h4><p class="note">No accuracy was measured (not a classifier).</p>'
    refs = []
    if float_accuracy is not None:
        refs.append(RefLine(float(float_accuracy), "float model (dense)", PALETTE["ref2"]))
    return "<h4>accuracy</h4>" + xy_chart(
        [Series("fake-quant model", acc, PALETTE["bar"])],
        x_range=(0.0, 1.0),
        refs=refs,
        x_label=x_label,
        y_label="top-1 accuracy (%)",
        x_fmt=_pct,
        y_fmt=lambda v: f"{100 * v:.4g}%",
        point_labels=True,
    )


def _ratio_plot(points: list[Mapping[str, Any]], dense: Mapping[str, Any], x_label: str) -> str:
    """Size, MACs and latency over the dense model's; empty without the dense figures."""
    series = []
    for key, label, _ in _METRICS:
        base = dense.get(key)
        if not base:
            continue
        ratios = [
            (float(p["sparsity"]), None if p.get(key) is None else float(p[key]) / float(base))
            for p in points
        ]
        if any(r is not None for _, r in ratios):
            series.append(Series(label, ratios, _METRIC_COLORS[key]))
    if not series:
        return ""
    return "<h4>size, MACs and latency against the dense model</h4>" + xy_chart(
        series,
        x_range=(0.0, 1.0),
        refs=[RefLine(1.0, "dense model (1x)", PALETTE["baseline"])],
        height=220,
        x_label=x_label,
        y_label="sweep point / dense (x)",
        x_fmt=_pct,
        y_fmt=lambda v: f"{v:.3g}x",
    )


def _sweep_table(points: list[Mapping[str, Any]]) -> str:
    head = "".join(
        f"<th class=num>{html.escape(h)}</th>"
        for h in ("sparsity target", "weights zero", "accuracy", *(m[1] for m in _METRICS))
    )
    rows = []
    for p in points:
        measured = p.get("weight_sparsity")
        accuracy = p.get("accuracy")
        cells = [
            f"{100 * float(p['sparsity']):.0f}%",
            "-" if measured is None else f"{100 * float(measured):.1f}%",
            "-" if accuracy is None else f"{100 * float(accuracy):.2f}%",
            *("-" if p.get(key) is None else fmt(p[key]) for key, _, fmt in _METRICS),
        ]
        rows.append(
            "<tr>" + "".join(f"<td class=num>{html.escape(c)}</td>" for c in cells) + "</tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
