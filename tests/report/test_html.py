"""report.html: every section renders, hostile strings are escaped, a minimal report renders."""

from __future__ import annotations

import doctest
import re
from pathlib import Path
from typing import Any

import pytest

from edgekiln.report import html as html_module
from edgekiln.report import svg
from edgekiln.report.html import render_html, write_html
from edgekiln.report.schema import ReportError, new_report
from tests.report.conftest import target

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_doctests() -> None:
    assert doctest.testmod(html_module, raise_on_error=False).failed == 0
    assert doctest.testmod(svg, raise_on_error=False).failed == 0


def test_sample_renders_every_section(sample: dict[str, Any]) -> None:
    page = render_html(sample)
    for heading in (
        "edgekiln run report: edgekiln.models:small_cnn",
        "<h2>Targets</h2>",
        "Accuracy per target",
        "Training loss",
        "Sparsity per layer",
        "Quantization error per layer",
        "Memory against board budgets",
        "Output differences (LSB)",
        "<h2>Runtime agreement</h2>",
        "<h2>Artifacts</h2>",
        "<h2>Recipe</h2>",
        "<h2>Target details</h2>",
    ):
        assert heading in page, heading
    assert page.count("<svg") == 8  # accuracy, loss, sparsity, SQNR, memory, 3 LSB histograms
    assert "3 of 4 targets ok" in page
    assert "child process killed by SIGSEGV (signal 11) in tflm.run" in page  # failed target
    assert "measured</span>" in page and "estimated</span>" in page
    assert "mcu:nrf52840 arena: 40.2 KiB of 256.0 KiB SRAM" in page
    assert "9f2c000000000000…" in page  # sha256 prefix
    assert "[sparsity]\ntarget = 0.5" in page  # recipe as TOML


def test_self_contained(sample: dict[str, Any]) -> None:
    page = render_html(sample)
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "@import" not in page and "url(" not in page


@pytest.mark.parametrize(
    "where",
    ["model.source", "data.description", "target.error", "target.details", "recipe", "artifact"],
)
def test_hostile_strings_are_escaped(sample: dict[str, Any], where: str) -> None:
    tflm = target(sample, "tflm")
    if where == "model.source":
        sample["model"]["source"] = HOSTILE
    elif where == "data.description":
        sample["data"]["description"] = HOSTILE
    elif where == "target.error":
        tflm["error"] = HOSTILE
    elif where == "target.details":
        tflm["details"] = {HOSTILE: HOSTILE}
    elif where == "recipe":
        sample["recipe"] = {HOSTILE: {HOSTILE: HOSTILE}}
    else:
        sample["artifacts"][0]["path"] = HOSTILE
    page = render_html(sample)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page


def test_hostile_layer_name_in_svg_is_escaped(sample: dict[str, Any]) -> None:
    sample["sparsity"]["layers"][0]["name"] = HOSTILE
    sample["quantization"]["layers"][0]["name"] = HOSTILE
    page = render_html(sample)
    assert "<script" not in page and "<img" not in page


def test_minimal_report_renders() -> None:
    page = render_html(new_report("validate", created="2026-12-03T19:10:00Z"))
    assert "edgekiln validate report: no model recorded" in page
    assert "No target was run." in page
    assert "No accuracy was measured." in page
    assert "No recipe was recorded." in page
    assert "<svg" not in page


def test_all_targets_failed_renders(sample: dict[str, Any]) -> None:
    for t in sample["targets"]:
        t.update(
            ok=False,
            error="boom",
            accuracy=None,
            lsb=None,
            latency_ms=None,
            latency_kind=None,
            arena_bytes=None,
            flash_bytes=None,
        )
    sample["training"] = None
    page = render_html(sample)
    assert "0 of 4 targets ok" in page
    assert "No LSB statistics were recorded." in page


def test_undefined_sqnr_renders_as_missing(sample: dict[str, Any]) -> None:
    sample["quantization"]["layers"][0]["sqnr_db"] = None
    page = render_html(sample)
    assert "<title>input: n/a</title>" in page


def test_invalid_report_is_refused(sample: dict[str, Any]) -> None:
    sample["targets"][0]["accuracy"] = "98%"
    with pytest.raises(ReportError, match=r"the report to render .*\n  - targets\[0\].accuracy"):
        render_html(sample)


def test_write_html(tmp_path: Path, sample: dict[str, Any]) -> None:
    path = write_html(sample, tmp_path / "report.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_per_layer_latency_of_a_board(sample: dict[str, Any]) -> None:
    mcu = target(sample, "mcu:nrf52840")
    mcu["details"] = {
        "kernels": "cmsis-nn",
        "board": {"core": "cortex-m4"},
        "layers": [
            {
                "index": 0,
                "opcode": "CONV_2D",
                "output": "stem_0",
                "macs": 112_896,
                "bytes_read": 992,
                "bytes_written": 12_544,
                "cycles": 764_679.99,
                "ms": 11.95,
            },
            {
                "index": 1,
                "opcode": "FULLY_CONNECTED",
                "output": "fc",
                "macs": 320,
                "bytes_read": 352,
                "bytes_written": 10,
                "cycles": 1_200.4,
                "ms": 0.02,
            },
        ],
    }
    page = render_html(sample)
    assert "Estimated latency per layer" in page
    assert "2 layers, 11.970 ms estimated (cmsis-nn kernels, cortex-m4)" in page
    assert '<td class="num">112,896</td>' in page and '<td class="num">764,680</td>' in page
    del mcu["details"]["layers"]
    assert "Estimated latency per layer" not in render_html(sample)


def test_long_names_break_at_dots_not_mid_word(sample: dict[str, Any]) -> None:
    sample["model"]["source"] = "edgekiln.models:small_cnn"
    sample["data"]["source"] = "data/<b>/x.npz"
    page = render_html(sample)
    assert "<code>edgekiln.<wbr>models:<wbr>small_cnn</code>" in page
    assert "<code>data/<wbr>&lt;b&gt;/<wbr>x.<wbr>npz</code>" in page  # escaped first
    assert "overflow-wrap: anywhere" not in page.split("<style>")[1].split(".err")[0]
