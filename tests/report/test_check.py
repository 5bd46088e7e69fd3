"""The regression gate: pass, each regression kind, unusable inputs, threshold precedence."""

from __future__ import annotations

import copy
import doctest
from typing import Any

import pytest

from edgekiln.report import check
from edgekiln.report.check import (
    CheckStatus,
    Regression,
    ThresholdError,
    Thresholds,
    check_reports,
    format_check,
)
from tests.report.conftest import target


@pytest.fixture
def baseline(sample: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(sample)


def test_doctests() -> None:
    assert doctest.testmod(check, raise_on_error=False).failed == 0


def test_identical_reports_pass(sample: dict[str, Any], baseline: dict[str, Any]) -> None:
    result = check_reports(sample, baseline)
    assert result.status == CheckStatus.PASS and int(result.status) == 0
    assert result.regressions == []
    assert result.compared_targets == ["onnxruntime", "litert", "tflm", "mcu:nrf52840"]
    assert result.notes == [
        "tflm: failed in the baseline and fails now: child process killed "
        "by SIGSEGV (signal 11) in tflm.run"
    ]
    assert result.thresholds_source == "baseline"


def test_changes_within_thresholds_pass(sample: dict[str, Any], baseline: dict[str, Any]) -> None:
    nrf = target(sample, "mcu:nrf52840")
    nrf["accuracy"] -= 0.005  # exactly 0.5 points: allowed
    nrf["latency_ms"] *= 1.10  # exactly 10 %: allowed
    target(sample, "onnxruntime")["agreement"] -= 1e-12  # float noise
    target(sample, "litert")["latency_ms"] *= 0.5  # faster
    assert check_reports(sample, baseline).status == CheckStatus.PASS


@pytest.mark.parametrize(
    ("name", "metric", "now", "expected"),
    [
        ("litert", "accuracy", 0.970, Regression("litert", "accuracy", 0.979, 0.970, 0.974)),
        (
            "onnxruntime",
            "agreement",
            0.999,
            Regression("onnxruntime", "agreement", 1.0, 0.999, 1.0),
        ),
        (
            "mcu:nrf52840",
            "arena_bytes",
            41_217,
            Regression("mcu:nrf52840", "arena_bytes", 41_216, 41_217, 41_216.0),
        ),
        (
            "mcu:nrf52840",
            "flash_bytes",
            100_000,
            Regression("mcu:nrf52840", "flash_bytes", 98_304, 100_000, 98_304.0),
        ),
        (
            "mcu:nrf52840",
            "latency_ms",
            50.0,
            Regression("mcu:nrf52840", "latency_ms", 41.52, 50.0, 41.52 * 1.1),
        ),
        (
            "mcu:nrf52840",
            "accuracy",
            None,
            Regression("mcu:nrf52840", "accuracy", 0.979, None, None),
        ),
    ],
)
def test_each_regression(
    sample: dict[str, Any],
    baseline: dict[str, Any],
    name: str,
    metric: str,
    now: Any,
    expected: Regression,
) -> None:
    target(sample, name)[metric] = now
    result = check_reports(sample, baseline)
    assert result.status == CheckStatus.REGRESSION and int(result.status) == 1
    assert len(result.regressions) == 1
    got = result.regressions[0]
    assert (got.target, got.metric, got.baseline, got.now) == (
        expected.target,
        expected.metric,
        expected.baseline,
        expected.now,
    )
    assert got.limit == pytest.approx(expected.limit)


def test_target_failing_now_is_an_ok_regression(
    sample: dict[str, Any], baseline: dict[str, Any]
) -> None:
    target(sample, "litert").update(ok=False, error="LiteRT rejected the model: no subgraph")
    result = check_reports(sample, baseline)
    assert result.status == CheckStatus.REGRESSION
    assert result.regressions == [Regression("litert", "ok", True, False, None)]
    assert "litert: fails now: LiteRT rejected the model: no subgraph" in result.notes
    assert "  litert  ok  baseline ok  now failed  must pass" in format_check(result)


def test_latency_of_different_kinds_is_not_compared(
    sample: dict[str, Any], baseline: dict[str, Any]
) -> None:
    target(sample, "litert").update(latency_ms=9.0, latency_kind="estimated")
    result = check_reports(sample, baseline)
    assert result.status == CheckStatus.PASS
    assert "litert: latency not compared: baseline is measured, this report estimated" in (
        result.notes
    )


def test_targets_in_one_report_only_are_notes(
    sample: dict[str, Any], baseline: dict[str, Any]
) -> None:
    sample["targets"] = [t for t in sample["targets"] if t["name"] != "litert"]
    sample["pairwise"] = []
    result = check_reports(sample, baseline)
    assert result.status == CheckStatus.PASS
    assert "litert: in the baseline only; not compared" in result.notes
    assert "litert" not in result.compared_targets


def test_unusable_schema_version(sample: dict[str, Any], baseline: dict[str, Any]) -> None:
    baseline["schema_version"] = 2
    result = check_reports(sample, baseline)
    assert result.status == CheckStatus.UNUSABLE and int(result.status) == 2
    assert result.notes == [
        "baseline: schema_version 2, this edgekiln compares version 1 only; "
        "re-create both reports with one edgekiln version"
    ]
    assert format_check(result).startswith("edgekiln check: UNUSABLE")


def test_unusable_no_common_targets(sample: dict[str, Any], baseline: dict[str, Any]) -> None:
    sample["targets"] = [t for t in sample["targets"] if t["name"] == "litert"]
    baseline["targets"] = [t for t in baseline["targets"] if t["name"] == "onnxruntime"]
    sample["pairwise"] = baseline["pairwise"] = []
    result = check_reports(sample, baseline)
    assert result.status == CheckStatus.UNUSABLE
    assert result.notes[0].startswith(
        "no target in common: baseline has ['onnxruntime'], report has ['litert']"
    )


def test_unusable_invalid_report(sample: dict[str, Any], baseline: dict[str, Any]) -> None:
    del sample["targets"][0]["ok"]
    result = check_reports(sample, baseline)
    assert result.status == CheckStatus.UNUSABLE
    assert result.notes == [
        "report is not a valid report: targets[0].ok: missing; expected true or false"
    ]


def test_threshold_precedence(sample: dict[str, Any], baseline: dict[str, Any]) -> None:
    target(sample, "litert")["accuracy"] = 0.969  # a 1.0-point drop
    # defaults (0.5 points) when the baseline recorded none
    baseline["check"] = None
    result = check_reports(sample, baseline)
    assert (result.status, result.thresholds_source) == (CheckStatus.REGRESSION, "defaults")
    # the baseline's recorded thresholds beat the defaults
    baseline["check"] = dict(Thresholds().as_dict(), max_accuracy_drop=0.02)
    result = check_reports(sample, baseline)
    assert (result.status, result.thresholds_source) == (CheckStatus.PASS, "baseline")
    # an explicit Thresholds beats the baseline's
    result = check_reports(sample, baseline, Thresholds(max_accuracy_drop=0.001))
    assert (result.status, result.thresholds_source) == (CheckStatus.REGRESSION, "argument")
    # an explicit mapping overrides only its keys on top of the baseline's
    result = check_reports(sample, baseline, {"max_latency_growth": 0.5})
    assert (result.status, result.thresholds_source) == (CheckStatus.PASS, "argument+baseline")
    assert result.thresholds.max_accuracy_drop == 0.02
    assert result.thresholds.max_latency_growth == 0.5


def test_thresholds_validation() -> None:
    with pytest.raises(
        ThresholdError,
        match=r"Thresholds.max_accuracy_drop must be a fraction "
        r"in \[0, 1\] .*got 5; for example max_accuracy_drop = 0.005",
    ):
        Thresholds(max_accuracy_drop=5)
    with pytest.raises(
        ThresholdError,
        match=r"check.max_arena_growth must be a finite number "
        r">= 0 .*got -0.1",
    ):
        Thresholds.from_dict({"max_arena_growth": -0.1})
    with pytest.raises(ThresholdError, match=r"check.max_latency_growth must be .*got '10%'"):
        Thresholds.from_dict({"max_latency_growth": "10%"})
    with pytest.raises(ThresholdError, match=r"check.latency: unknown threshold; allowed: "):
        Thresholds.from_dict({"latency": 0.1})
    with pytest.raises(ThresholdError, match=r"thresholds.max_flash_growth must be"):
        check_reports({"schema_version": 1}, {"schema_version": 1}, {"max_flash_growth": True})


def test_format_check_one_line_per_regression(
    sample: dict[str, Any], baseline: dict[str, Any]
) -> None:
    target(sample, "mcu:nrf52840").update(arena_bytes=45_312, accuracy=0.95)
    text = format_check(check_reports(sample, baseline))
    lines = text.splitlines()
    assert lines[0] == (
        "edgekiln check: REGRESSION (2 regressions in 4 compared targets; thresholds: baseline)"
    )
    assert lines[1] == (
        "  mcu:nrf52840  accuracy     baseline 97.90%  now 95.00%  lowest allowed 97.40%"
    )
    assert lines[2] == (
        "  mcu:nrf52840  arena_bytes  baseline 41,216 B  now 45,312 B  highest allowed 41,216 B"
    )
