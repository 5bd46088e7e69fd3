"""report.html: one self-contained page (inline CSS and SVG, no JavaScript, no external files).

Sections, top to bottom: header (model, data, training, run), target summary table, charts
(accuracy per target against the float and fake-quant accuracy, training loss, per-layer
sparsity, per-layer SQNR, memory against board budgets, LSB histograms), pairwise runtime
agreement, artifacts, recipe, per-target details. A section whose data is null says so.

Every string taken from the report is HTML-escaped, so a hostile model name cannot inject
markup:

>>> from edgekiln.report.schema import new_report
>>> r = new_report("run", created="2026-12-03T19:10:00Z")
>>> r["model"] = {"source": "<script>alert(1)</script>", "input_shape": [1, 28, 28],
...               "parameters": 1234, "task": "classification"}
>>> page = render_html(r)
>>> "<script>" in page, "&lt;script&gt;" in page
(False, True)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from edgekiln.ir import atomic_write
from edgekiln.report.schema import SCHEMA_DOC, ReportError, _problems_message, validate_report
from edgekiln.report.sparsity_html import sparsity_sections
from edgekiln.report.svg import PALETTE, RefLine, hbar_chart, line_chart, vbar_chart

__all__ = ["render_html", "write_html"]

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
  color: #25292e; background: #f6f7f9; margin: 0; line-height: 1.45; font-size: 14px; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 48px; background: #fff;
  min-height: 100vh; box-shadow: 0 0 0 1px #e3e6ea; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #e3e6ea; }
h3 { font-size: 14px; margin: 20px 0 6px; color: #444b53; }
.sub { color: #6a717a; margin: 0 0 18px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 12px; }
.card { border: 1px solid #e3e6ea; border-radius: 6px; padding: 10px 12px; }
.card h3 { margin: 0 0 6px; font-size: 12px; text-transform: uppercase; letter-spacing: .04em;
  color: #6a717a; }
.card dl { display: grid; grid-template-columns: auto minmax(0, 1fr); gap: 2px 10px; margin: 0; }
.card dt { color: #6a717a; } .card dd { margin: 0; min-width: 0; overflow-wrap: break-word; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #eceef1;
  vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed td { background: #fdf3f3; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 11px;
  font-weight: 600; line-height: 18px; white-space: nowrap; }
.ok { background: #e3f4e1; color: #2d6a27; } .bad { background: #f8dcdc; color: #9b2c2c; }
.est { background: #eef0f3; color: #555c64; } .meas { background: #e2ecf7; color: #2d5b8a; }
.err { color: #9b2c2c; font-size: 12px; margin-top: 2px; overflow-wrap: anywhere; }
.muted { color: #6a717a; } .note { color: #6a717a; font-size: 12px; margin: 4px 0 0; }
.hists { display: flex; flex-wrap: wrap; gap: 8px 24px; }
.hist h3 { margin: 8px 0 0; }
pre { background: #f6f8fa; border: 1px solid #e3e6ea; border-radius: 6px; padding: 10px 12px;
  overflow-x: auto; font-size: 12px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
details { margin: 4px 0; } summary { cursor: pointer; }
svg { display: block; max-width: 100%; height: auto; }
footer { margin-top: 40px; color: #8a9099; font-size: 12px; }
"""


# ---------------------------------------------------------------------------------------------
# Formatting: every value that reaches the page goes through one of these.


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _code(value: Any) -> str:
    """``value`` as code that a narrow card may break after ``.``, ``:`` and ``/``, not mid-name."""
    text = _e(value)
    for mark in (".", ":", "/"):
        text = text.replace(mark, mark + "<wbr>")
    return f"<code>{text}</code>"


def _pct(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if n < 1024:
        return f"{n:,.0f} B"
    if n < 1024 * 1024:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / 1024 / 1024:,.2f} MiB"


def _num(v: float | None, spec: str = ",") -> str:
    return "—" if v is None else format(v, spec)


def _dl(rows: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _table(
    head: Sequence[str],
    rows: Sequence[Sequence[str]],
    num_cols: set[int],
    failed_rows: frozenset[int] = frozenset(),
) -> str:
    """``rows`` hold already-escaped HTML cells; ``num_cols`` are right-aligned;
    ``failed_rows`` (indices) are tinted red."""
    th = "".join(
        f'<th class="num">{_e(h)}</th>' if i in num_cols else f"<th>{_e(h)}</th>"
        for i, h in enumerate(head)
    )
    body = []
    for k, row in enumerate(rows):
        cls = ' class="failed"' if k in failed_rows else ""
        tds = "".join(
            f'<td class="num">{c}</td>' if i in num_cols else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _missing(what: str) -> str:
    return f'<p class="muted">{_e(what)}</p>'


# ---------------------------------------------------------------------------------------------
# Sections.


def _header(r: Mapping[str, Any]) -> str:
    model, data, training = r["model"], r["data"], r["training"]
    title = model["source"] if model else "no model recorded"
    targets = r["targets"]
    failed = sum(1 for t in targets if not t["ok"])
    status = (
        f'<span class="badge {"bad" if failed else "ok"}">'
        f"{len(targets) - failed} of {len(targets)} targets ok</span>"
    )
    out = [
        f"<h1>edgekiln {_e(r['kind'])} report: {_e(title)}</h1>",
        f'<p class="sub">{_e(r["created"])} · edgekiln {_e(r["edgekiln_version"])} · {status}</p>',
        '<div class="cards">',
    ]
    if model:
        shape = "×".join(str(d) for d in model["input_shape"])
        out.append(
            '<div class="card"><h3>Model</h3>'
            + _dl(
                [
                    ("source", _code(model["source"])),
                    ("input", _e(shape)),
                    ("parameters", _num(model["parameters"])),
                    ("task", _e(model["task"])),
                ]
            )
            + "</div>"
        )
    if data:
        out.append(
            '<div class="card"><h3>Data</h3>'
            + _dl(
                [
                    ("source", _code(data["source"])),
                    ("description", _e(data["description"])),
                    ("train / test", f"{data['n_train']:,} / {data['n_test']:,}"),
                ]
            )
            + "</div>"
        )
    if training:
        out.append(
            '<div class="card"><h3>Training</h3>'
            + _dl(
                [
                    ("float accuracy", _pct(training["float_accuracy"])),
                    ("fake-quant accuracy", _pct(training["fake_quant_accuracy"])),
                    ("epochs", f"{training['float_epochs']} float + {training['qat_epochs']} QAT"),
                    ("time", f"{training['seconds']:,.1f} s"),
                ]
            )
            + "</div>"
        )
    sparsity, quant = r["sparsity"], r["quantization"]
    out.append(
        '<div class="card"><h3>Model after training</h3>'
        + _dl(
            [
                ("sparsity", _pct(sparsity["total"], 1) if sparsity else "—"),
                ("quantized layers", str(len(quant["layers"])) if quant else "—"),
                ("artifacts", str(len(r["artifacts"]))),
                ("targets", str(len(targets))),
            ]
        )
        + "</div></div>"
    )
    return "".join(out)


def _latency_cell(t: Mapping[str, Any]) -> str:
    if t["latency_ms"] is None:
        return "—"
    kind = t["latency_kind"]
    badge = (
        f' <span class="badge {"meas" if kind == "measured" else "est"}">{_e(kind)}</span>'
        if kind
        else ""
    )
    p90 = (
        f'<br><span class="muted">p90 {t["latency_p90_ms"]:.3f} ms</span>'
        if t["latency_p90_ms"] is not None
        else ""
    )
    return f"{t['latency_ms']:.3f} ms{badge}{p90}"


def _summary(r: Mapping[str, Any]) -> str:
    targets = r["targets"]
    if not targets:
        return "<h2>Targets</h2>" + _missing("No target was run.")
    rows = []
    for t in targets:
        if t["ok"]:
            status = '<span class="badge ok">ok</span>'
        else:
            status = f'<span class="badge bad">failed</span><div class="err">{_e(t["error"])}</div>'
        lsb = t["lsb"]
        board = t["board"]
        name = f"<strong>{_e(t['name'])}</strong>"
        if board:
            name += (
                f'<br><span class="muted">{_e(board["core"])}, '
                f"{board['clock_hz'] / 1e6:g} MHz</span>"
            )
        rows.append(
            [
                status,
                name,
                _pct(t["accuracy"]),
                _pct(t["agreement"]),
                _num(lsb["max"] if lsb else None),
                _pct(lsb["within_1"] if lsb else None),
                _latency_cell(t),
                _bytes(t["arena_bytes"]),
                _bytes(t["flash_bytes"]),
            ]
        )
    failed = frozenset(i for i, t in enumerate(targets) if not t["ok"])
    head = [
        "status",
        "target",
        "accuracy",
        "agreement",
        "LSB max",
        "within 1 LSB",
        "latency",
        "arena",
        "flash",
    ]
    note = (
        '<p class="note">Agreement: top-1 agreement with the fake-quantized PyTorch model. '
        "LSB: |target − fake-quant| on the outputs, in steps of the output scale. Latency: "
        "median per inference; <em>measured</em> on this host or <em>estimated</em> by the "
        "board latency model.</p>"
    )
    return "<h2>Targets</h2>" + _table(head, rows, {2, 3, 4, 5, 6, 7, 8}, failed) + note


def _accuracy_chart(r: Mapping[str, Any]) -> str:
    targets, training = r["targets"], r["training"]
    refs = []
    if training and training["float_accuracy"] is not None:
        refs.append(RefLine(training["float_accuracy"], "float model", PALETTE["ref2"]))
    if training and training["fake_quant_accuracy"] is not None:
        refs.append(RefLine(training["fake_quant_accuracy"], "fake-quant model", PALETTE["ref1"]))
    rows = [(t["name"], t["accuracy"] if t["ok"] else None) for t in targets]
    values = [v for _, v in rows if v is not None] + [ref.value for ref in refs]
    if not values:
        return "<h3>Accuracy per target</h3>" + _missing("No accuracy was measured.")
    low = min(values)
    lo = max(0.0, math.floor((low - 0.02) * 10) / 10) if low >= 0.5 else 0.0
    axis = f"top-1 accuracy (axis starts at {100 * lo:.0f}%)" if lo > 0 else "top-1 accuracy"
    colors = [PALETTE["bar"] if t["ok"] else PALETTE["bad"] for t in targets]
    svg = hbar_chart(
        rows,
        lo=lo,
        hi=1.0,
        fmt=lambda v: f"{100 * v:.2f}%",
        refs=refs,
        colors=colors,
        axis_label=axis,
        tick_fmt=lambda v: f"{100 * v:g}%",
    )
    return "<h3>Accuracy per target</h3>" + svg


def _loss_chart(r: Mapping[str, Any]) -> str:
    training = r["training"]
    if not training:
        return ""
    history = training["loss_history"]
    if not history["float"] and not history["qat"]:
        return ""
    series = [
        ("float training loss", history["float"], PALETTE["bar"]),
        ("QAT fine-tuning loss", history["qat"], PALETTE["ref1"]),
    ]
    return "<h3>Training loss</h3>" + line_chart(
        series, x_label="epoch: float training, then QAT fine-tuning"
    )


def _sparsity_chart(r: Mapping[str, Any]) -> str:
    sparsity = r["sparsity"]
    if not sparsity or not sparsity["layers"]:
        return "<h3>Sparsity per layer</h3>" + _missing("No sparsity was recorded.")
    rows = [(layer["name"], layer["sparsity"]) for layer in sparsity["layers"]]
    refs = [RefLine(sparsity["total"], f"whole model {100 * sparsity['total']:.1f}%")]
    svg = hbar_chart(
        rows,
        hi=1.0,
        fmt=lambda v: f"{100 * v:.1f}%",
        refs=refs,
        tick_fmt=lambda v: f"{100 * v:g}%",
        axis_label="fraction of weights that are zero",
    )
    return "<h3>Sparsity per layer</h3>" + svg


def _quant_chart(r: Mapping[str, Any]) -> str:
    quant = r["quantization"]
    if not quant or not quant["layers"]:
        return "<h3>Quantization error per layer</h3>" + _missing("No quantization was recorded.")
    layers = quant["layers"]
    rows = [(layer["name"], layer["sqnr_db"]) for layer in layers]
    svg = hbar_chart(
        rows,
        fmt=lambda v: f"{v:.1f} dB",
        tick_fmt=lambda v: f"{v:g} dB",
        axis_label="SQNR in dB (higher is better; 6 dB per bit)",
    )
    table_rows = [
        [
            f"<code>{_e(layer['name'])}</code>",
            f"{layer['scale']:.6g}",
            str(layer["zero_point"]),
            _num(layer["sqnr_db"], ".2f"),
            _pct(layer["clipped_fraction"], 3),
        ]
        for layer in layers
    ]
    table = _table(["layer", "scale", "zero point", "SQNR dB", "clipped"], table_rows, {1, 2, 3, 4})
    return (
        "<h3>Quantization error per layer</h3>"
        + svg
        + f"<details><summary>scales and zero points ({len(layers)} layers)</summary>"
        + table
        + "</details>"
    )


def _memory_chart(r: Mapping[str, Any]) -> str:
    rows: list[tuple[str, float | None]] = []
    colors = []
    with_state = False  # some arena bar includes the interpreter state (say so under the chart)
    for t in r["targets"]:
        board = t["board"]
        if not board:
            continue
        arena, arena_what = _arena_against_sram(t)
        with_state |= arena_what == "arena+state"
        for what, used, budget, budget_name in (
            (arena_what, arena, board["sram_bytes"], "SRAM"),
            ("flash", t["flash_bytes"], board["flash_bytes"], "flash"),
        ):
            label = f"{t['name']} {what}: {_bytes(used)} of {_bytes(budget)} {budget_name}"
            share = None if used is None else used / budget
            rows.append((label, share))
            colors.append(PALETTE["bad"] if share is not None and share > 1 else PALETTE["bar"])
    if not rows:
        return "<h3>Memory against board budgets</h3>" + _missing(
            "No microcontroller target with a board profile was run."
        )
    hi = max([1.1] + [v * 1.08 for _, v in rows if v is not None])
    note = ""
    if with_state:
        note = (
            '<p class="note">arena+state: the planned tensor arena plus the estimated TFLM '
            "interpreter state, the figure the target checked against the board's SRAM.</p>"
        )
    svg = hbar_chart(
        rows,
        hi=hi,
        fmt=lambda v: f"{100 * v:.1f}%",
        colors=colors,
        tick_fmt=lambda v: f"{100 * v:g}%",
        refs=[RefLine(1.0, "board budget (100%)", PALETTE["budget"])],
        max_label_chars=60,
        axis_label="share of the board's SRAM (arena) and flash",
    )
    return "<h3>Memory against board budgets</h3>" + svg + note


def _arena_against_sram(t: Mapping[str, Any]) -> tuple[int | None, str]:
    """The arena figure the target checked against the board's SRAM, and its row label.

    ``mcu:*`` targets check ``details.budget.arena_need_bytes`` ("arena+state": the planned
    arena plus the estimated TFLM interpreter state), which is more than ``arena_bytes`` (the
    planned arena alone); drawing it makes a bar pass 100% exactly when the target failed for
    SRAM. A report without that figure (older, or written by hand) is drawn with
    ``arena_bytes``, labelled "arena".
    """
    details = t.get("details") or {}
    budget = details.get("budget") if isinstance(details, Mapping) else None
    need = budget.get("arena_need_bytes") if isinstance(budget, Mapping) else None
    if isinstance(need, int) and not isinstance(need, bool):
        return need, "arena+state"
    return t["arena_bytes"], "arena"


def _lsb_histograms(r: Mapping[str, Any]) -> str:
    charts = []
    for t in r["targets"]:
        lsb = t["lsb"]
        if not lsb:
            continue
        hist = sorted(((int(k), v) for k, v in lsb["histogram"].items()))
        bars = [(str(k), float(v)) for k, v in hist]
        caption = (
            f'<h3>{_e(t["name"])}</h3><div class="muted">max {lsb["max"]} LSB · mean '
            f"{lsb['mean']:.3f} · within 1 LSB {_pct(lsb['within_1'])}</div>"
        )
        charts.append(
            f'<div class="hist">{caption}'
            + vbar_chart(bars, x_label="|target − fake-quant| in LSB")
            + "</div>"
        )
    if not charts:
        return "<h3>Output differences (LSB)</h3>" + _missing("No LSB statistics were recorded.")
    return "<h3>Output differences (LSB)</h3>" + f'<div class="hists">{"".join(charts)}</div>'


def _histogram_text(hist: Mapping[str, int]) -> str:
    items = sorted(((int(k), v) for k, v in hist.items()))
    return " · ".join(f"{k}: {v:,}" for k, v in items) or "—"


def _pairwise(r: Mapping[str, Any]) -> str:
    pairs = r["pairwise"]
    if not pairs:
        return "<h2>Runtime agreement</h2>" + _missing("No pairwise comparison was recorded.")
    rows = [
        [
            _e(p["a"]),
            _e(p["b"]),
            f"{p['compared']:,}",
            f"{p['differing']:,}",
            _pct(p["differing"] / p["compared"] if p["compared"] else None, 3),
            str(p["max_lsb"]),
            _e(_histogram_text(p["histogram"])),
        ]
        for p in pairs
    ]
    head = ["a", "b", "compared", "differing", "differing %", "max LSB", "histogram (LSB: count)"]
    return "<h2>Runtime agreement</h2>" + _table(head, rows, {2, 3, 4, 5})


def _artifacts(r: Mapping[str, Any]) -> str:
    artifacts = r["artifacts"]
    if not artifacts:
        return "<h2>Artifacts</h2>" + _missing("No artifact was written.")
    rows = [
        [
            f"<code>{_e(a['path'])}</code>",
            _e(a["format"]),
            f"{a['bytes']:,}",
            f"{a['gzip_bytes']:,}",
            f'<code title="{_e(a["sha256"])}">{_e(a["sha256"][:16])}…</code>',
        ]
        for a in artifacts
    ]
    return "<h2>Artifacts</h2>" + _table(
        ["path", "format", "bytes", "gzip bytes", "sha256"], rows, {2, 3}
    )


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if v is None:
        return '"" # null'
    return json.dumps(str(v))


def _toml(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The recipe as TOML text (tables after plain keys), the way a user writes it."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, Mapping)]
    for k, v in d.items():
        if isinstance(v, Mapping):
            name = f"{prefix}.{k}" if prefix else str(k)
            lines += (["", f"[{name}]"] if lines else [f"[{name}]"]) + _toml(v, name)
    return lines


def _recipe(r: Mapping[str, Any]) -> str:
    recipe = r["recipe"]
    if recipe is None:
        return "<h2>Recipe</h2>" + _missing("No recipe was recorded.")
    return "<h2>Recipe</h2>" + f"<pre>{_e(chr(10).join(_toml(recipe)))}</pre>"


def _layer_latency(r: Mapping[str, Any]) -> str:
    """Per-layer estimate of each simulated board: MACs, memory traffic, cycles, ms."""
    parts = []
    for t in r["targets"]:
        details = t.get("details") or {}
        layers = details.get("layers")
        if not t["name"].startswith("mcu:") or not layers:
            continue
        total = sum(float(layer["ms"]) for layer in layers)
        head = ["#", "operator", "output", "MACs", "bytes read", "bytes written", "cycles", "ms"]
        rows = [
            [
                str(layer["index"]),
                _e(layer["opcode"]),
                f"<code>{_e(layer['output'])}</code>",
                _num(layer["macs"]),
                _num(layer["bytes_read"]),
                _num(layer["bytes_written"]),
                _num(layer["cycles"], ",.0f"),
                f"{float(layer['ms']):.3f}",
            ]
            for layer in layers
        ]
        board = details.get("board") or {}
        summary = (
            f"<code>{_e(t['name'])}</code>: {len(layers)} layers, {total:.3f} ms estimated "
            f"({_e(details.get('kernels', '?'))} kernels, {_e(board.get('core', '?'))})"
        )
        parts.append(
            f"<details><summary>{summary}</summary>"
            + _table(head, rows, {0, 3, 4, 5, 6, 7})
            + "</details>"
        )
    if not parts:
        return ""
    return "<h3>Estimated latency per layer</h3>" + "".join(parts)


def _details(r: Mapping[str, Any]) -> str:
    parts = []
    for t in r["targets"]:
        extra = {"artifact": t["artifact"], "board": t["board"], "details": t["details"]}
        text = json.dumps(extra, indent=2, sort_keys=True, default=str)
        parts.append(
            f"<details><summary><code>{_e(t['name'])}</code></summary><pre>{_e(text)}</pre>"
            "</details>"
        )
    if not parts:
        return ""
    return "<h2>Target details</h2>" + "".join(parts)


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (a string).

    Raises :class:`~edgekiln.report.schema.ReportError` listing the schema problems when
    ``report`` is not a valid schema-version-1 report.
    """
    problems = validate_report(report)
    if problems:
        raise ReportError(_problems_message("the report to render", problems), problems)
    model = report["model"]
    title = f"edgekiln report: {model['source']}" if model else "edgekiln report"
    body = [
        _header(report),
        _summary(report),
        "<h2>Charts</h2>",
        _accuracy_chart(report),
        _loss_chart(report),
        _sparsity_chart(report),
        sparsity_sections(report),
        _quant_chart(report),
        _memory_chart(report),
        _layer_latency(report),
        _lsb_histograms(report),
        _pairwise(report),
        _artifacts(report),
        _recipe(report),
        _details(report),
        f"<footer>report.json schema version {report['schema_version']} "
        f"({_e(SCHEMA_DOC)}) · edgekiln {_e(report['edgekiln_version'])}</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + "\n".join(part for part in body if part)
        + "</main></body></html>\n"
    )


def write_html(report: Mapping[str, Any], path: str | Path) -> Path:
    """Render ``report`` and write the page atomically to ``path``; returns the path."""
    page = render_html(report).encode("utf-8")
    return atomic_write(path, lambda f: f.write(page))
