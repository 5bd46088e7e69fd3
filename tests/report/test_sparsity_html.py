"""report.html's sparsity sections: the before/after table and the sweep's line plots."""

from __future__ import annotations

import doctest
import re
from typing import Any

import pytest

from edgekiln.report import sparsity_html
from edgekiln.report.html import render_html
from edgekiln.report.sparsity_html import sparsity_sections
from edgekiln.report.svg import PALETTE, RefLine, Series, xy_chart

DENSE = {"tflite_bytes": 40_960, "gzip_bytes": 36_864, "macs": 2_000_000, "estimated_ms": 20.0}


def _point(sparsity: float, accuracy: float | None, shrink: float) -> dict[str, Any]:
    return {
        "sparsity": sparsity,
        "weight_sparsity": sparsity - 0.01,
        "accuracy": accuracy,
        **{key: value * shrink for key, value in DENSE.items()},
    }


SWEEP = [_point(0.75, 0.951, 0.5), _point(0.25, 0.978, 0.9), _point(0.5, 0.97, 0.7)]


def _report(sweep: list[dict[str, Any]], dense: dict[str, Any] | None = DENSE) -> dict[str, Any]:
    before_after = None
    if dense is not None:  # the run's own model is the 50% point
        before_after = {"board": "nucleo-l4r5zi", "kernels": "cmsis-nn", "dense": dense}
        before_after["sparse"] = SWEEP[2]
    return {
        "training": {"float_accuracy": 0.982},
        "sparsity": {"before_after": before_after},
        "sweep": sweep,
    }


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", page, flags=re.S)


def _circle_xs(svg: str) -> list[float]:
    return [float(x) for x in re.findall(r'<circle cx="([0-9.]+)"', svg)]


def _dashed_ys(svg: str) -> list[float]:
    # reference lines across the plot (the legend's dashed swatches are 2.5 px wide)
    lines = re.findall(r'<line x1="[0-9.]+" y1="([0-9.]+)"[^>]*stroke-width="1.5"', svg)
    return [float(y) for y in lines]


def test_doctests() -> None:
    result = doctest.testmod(sparsity_html, raise_on_error=False)
    assert result.failed == 0 and result.attempted > 0


def test_sweep_is_two_line_plots_over_sparsity_not_bars() -> None:
    html = sparsity_sections(_report(SWEEP))
    accuracy, ratios = _svgs(html)
    assert "<rect" not in accuracy + ratios  # no bars
    assert accuracy.count("<polyline") == 1 and accuracy.count("<circle") == 3
    assert ratios.count("<polyline") == 4 and ratios.count("<circle") == 12  # 4 metrics x 3
    xs = _circle_xs(accuracy)
    assert xs == sorted(xs)  # drawn in sparsity order though the report lists 75% first


def test_sweep_axes_say_what_and_in_which_unit() -> None:
    accuracy, ratios = _svgs(sparsity_sections(_report(SWEEP)))
    for svg in (accuracy, ratios):
        assert "sparsity target (% of conv and linear weights pruned)" in svg
        assert "rotate(-90" in svg  # the y axis is labelled too
        for tick in ("0%", "20%", "40%", "60%", "80%", "100%"):
            assert f">{tick}</text>" in svg
    assert "top-1 accuracy (%)" in accuracy and ">97.8%</text>" in accuracy  # point labels
    assert "sweep point / dense (x)" in ratios and ">1x</text>" in ratios


def test_sweep_baselines_are_dashed_horizontal_lines() -> None:
    accuracy, ratios = _svgs(sparsity_sections(_report(SWEEP)))
    assert "float model (dense)" in accuracy and PALETTE["ref2"] in accuracy
    assert "float model (dense): 98.2%" in accuracy  # the dashed line's tooltip
    assert "dense model (1x)" in ratios and "dense model (1x): 1x" in ratios
    (float_y,) = _dashed_ys(accuracy)
    acc_ys = [float(y) for y in re.findall(r'<circle cx="[0-9.]+" cy="([0-9.]+)"', accuracy)]
    assert float_y < min(acc_ys)  # 98.2% sits above every sweep point (SVG y grows down)


def test_points_carry_their_values_in_tooltips_and_the_table() -> None:
    html = sparsity_sections(_report(SWEEP))
    assert "<title>fake-quant model at 50%: 97%</title>" in html
    assert "<title>TFLite size at 75%: 0.5x</title>" in html
    table = html[html.rindex("<table>") :]  # after the before/after table
    assert [c for c in re.findall(r"<td class=num>([^<]*)</td>", table)][:7] == [
        "25%",
        "24.0%",
        "97.80%",
        "36.0 KiB",
        "32.4 KiB",
        "1.80 M",
        "18.0 ms",
    ]


def test_sweep_without_dense_figures_or_accuracy() -> None:
    # a recipe that does not prune has no before/after; a reconstruction task no accuracy
    html = sparsity_sections(_report([_point(0.5, None, 0.7)], dense=None))
    assert "What sparsity buys" not in html
    assert "No accuracy was measured" in html
    assert _svgs(html) == []  # nothing to plot, the table still holds the sizes
    assert "28.0 KiB" in html


def test_a_missing_accuracy_breaks_the_line_and_drops_the_point() -> None:
    sweep = [_point(0.25, 0.97, 0.9), _point(0.5, None, 0.7), _point(0.75, 0.95, 0.5)]
    accuracy = _svgs(sparsity_sections(_report(sweep)))[0]
    assert accuracy.count("<circle") == 2 and "<polyline" not in accuracy


def test_hostile_labels_are_escaped() -> None:
    svg = xy_chart(
        [Series("<b>s</b>", [(0.0, 1.0), (1.0, 2.0)])], refs=[RefLine(1.5, "<i>ref</i>")]
    )
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "&lt;i&gt;ref&lt;/i&gt;" in svg


@pytest.mark.parametrize("ys", [[0.5, 0.5], [0.0, 0.0], [-3.0, 7.0]])
def test_xy_chart_keeps_every_point_inside_the_plot(ys: list[float]) -> None:
    svg = xy_chart([Series("s", [(0.0, ys[0]), (1.0, ys[1])])], height=200)
    cys = [float(y) for y in re.findall(r'<circle cx="[0-9.]+" cy="([0-9.]+)"', svg)]
    grid = [float(y) for y in re.findall(rf'y1="([0-9.]+)"[^>]*stroke="{PALETTE["grid"]}"', svg)]
    assert min(grid) <= min(cys) and max(cys) <= max(grid)


def test_report_page_draws_the_sweep(sample: dict[str, Any]) -> None:
    sample["sweep"] = SWEEP
    sample["sparsity"]["before_after"] = _report(SWEEP)["sparsity"]["before_after"]
    page = render_html(sample)
    assert "<h3>Sparsity sweep</h3>" in page and "What sparsity buys" in page
    assert page.count("<svg") == 8 + 2  # the sample's charts, then accuracy and ratios
