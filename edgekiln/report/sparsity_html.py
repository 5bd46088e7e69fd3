"""The report's "what sparsity buys" sections: dense against sparse, and the sweep."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from edgekiln.report.svg import hbar_chart

_METRICS = (
    ("tflite_bytes", "TFLite size", lambda v: f"{v / 1024:.1f} KiB"),
    ("gzip_bytes", "gzip size", lambda v: f"{v / 1024:.1f} KiB"),
    ("macs", "MACs", lambda v: f"{v / 1e6:.2f} M"),
    ("estimated_ms", "estimated latency", lambda v: f"{v:.1f} ms"),
)


def sparsity_sections(report: Mapping[str, Any]) -> str:
    """HTML for ``sparsity.before_after`` and ``sweep`` (empty when the run has neither)."""
    parts = []
    before_after = (report.get("sparsity") or {}).get("before_after")
    if before_after:
        parts.append(_before_after(before_after))
    sweep = report.get("sweep") or []
    if sweep:
        parts.append(_sweep(sweep))
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


def _sweep(points: list[Mapping[str, Any]]) -> str:
    labels = [f"{100 * float(p['sparsity']):.0f}% sparsity" for p in points]
    charts = [
        "<h3>Sparsity sweep</h3>",
        "<p>Each level fine-tuned from the same float model with the run's recipe.</p>",
    ]
    acc = [(label, p.get("accuracy")) for label, p in zip(labels, points, strict=True)]
    if any(v is not None for _, v in acc):
        charts.append(
            "<h4>accuracy</h4>"
            + hbar_chart(
                acc,
                hi=1.0,
                fmt=lambda v: f"{100 * v:.2f}%",
                tick_fmt=lambda v: f"{100 * v:g}%",
                axis_label="top-1 accuracy of the fake-quant model",
            )
        )
    for key, label, fmt in _METRICS:
        rows = [(lab, p.get(key)) for lab, p in zip(labels, points, strict=True)]
        charts.append(f"<h4>{label}</h4>" + hbar_chart(rows, fmt=fmt, axis_label=label))
    return "\n".join(charts)
