"""report.json schema version 1: validation messages, load and write."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest

from edgekiln.report import schema
from edgekiln.report.schema import (
    ReportError,
    load_report,
    new_report,
    validate_report,
    write_report,
)
from tests.report.conftest import target


def test_doctests() -> None:
    assert doctest.testmod(schema, raise_on_error=False).failed == 0


def test_sample_and_new_report_are_valid(sample: dict[str, Any]) -> None:
    assert validate_report(sample) == []
    assert validate_report(new_report("validate")) == []


def test_unknown_extra_keys_are_allowed(sample: dict[str, Any]) -> None:
    sample["future_section"] = {"x": 1}
    target(sample, "litert")["new_metric"] = 3
    assert validate_report(sample) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda r: target(r, "litert").update(accuracy=1.7),
            "targets[1].accuracy: expected a fraction in [0, 1] or null, got 1.7 (number)",
        ),
        (
            lambda r: target(r, "tflm").pop("ok"),
            "targets[2].ok: missing; expected true or false",
        ),
        (
            lambda r: target(r, "onnxruntime").update(arena_bytes=True),
            "targets[0].arena_bytes: expected a non-negative integer or null, got true (boolean)",
        ),
        (
            lambda r: target(r, "onnxruntime").update(name="coreml"),
            'targets[0].name: expected a target name: "onnxruntime", "litert", "tflm" or '
            '"mcu:<board>", got "coreml" (string)',
        ),
        (
            lambda r: r.update(kind="train"),
            'kind: expected one of "run" | "validate", got "train" (string)',
        ),
        (
            lambda r: r.update(created="2026-12-03 19:10"),
            'created: expected a UTC ISO 8601 time "YYYY-MM-DDTHH:MM:SSZ", got "2026-12-03 19:10"',
        ),
        (
            lambda r: r.update(created="2026-13-03T19:10:00Z"),
            "created: '2026-13-03T19:10:00Z' is not a real date and time",
        ),
        (
            lambda r: r["artifacts"][0].update(sha256="ABC"),
            'artifacts[0].sha256: expected 64 lowercase hex digits, got "ABC" (string)',
        ),
        (
            lambda r: r["artifacts"][0].update(path="../model.onnx"),
            "artifacts[0].path: '../model.onnx' is not relative to the run directory",
        ),
        (
            lambda r: target(r, "litert")["lsb"]["histogram"].update({"-1": 3}),
            "targets[1].lsb.histogram: key '-1' is not an LSB difference",
        ),
        (
            lambda r: r["quantization"]["layers"][1].update(sqnr_db=float("inf")),
            "quantization.layers[1].sqnr_db: expected a finite number or null, "
            "got Infinity (number)",
        ),
        (
            lambda r: r["training"]["loss_history"].update(qat="0.15"),
            'training.loss_history.qat: expected a list of a finite number, got "0.15" (string)',
        ),
        (
            lambda r: r.update(targets=r["targets"] + [dict(r["targets"][0])]),
            "targets[4].name: 'onnxruntime' appears twice (also targets[0])",
        ),
        (
            lambda r: target(r, "litert").update(latency_kind=None),
            "targets[1].latency_kind: null while latency_ms is set",
        ),
        (
            lambda r: target(r, "tflm").update(error=None),
            "targets[2].error: a failed target (ok false) needs an error text, got null (null)",
        ),
        (
            lambda r: r["pairwise"][0].update(b="tvm"),
            "pairwise[0].b: 'tvm' is not a target of this report (targets: litert, mcu:nrf52840,",
        ),
        (
            lambda r: r["check"].update(max_latency_growth=-0.1),
            "check.max_latency_growth: expected a finite number >= 0, got -0.1 (number)",
        ),
        (
            lambda r: r.update(model={"source": "x"}),
            "model.input_shape: missing; expected a list of a positive integer",
        ),
    ],
)
def test_each_problem_names_path_value_and_expectation(
    sample: dict[str, Any], mutate: Any, expected: str
) -> None:
    mutate(sample)
    problems = validate_report(sample)
    assert any(p.startswith(expected) for p in problems), problems


def test_validate_report_may_name_artifacts_anywhere_and_record_some_thresholds(
    sample: dict[str, Any],
) -> None:
    sample["kind"] = "validate"
    sample["artifacts"][0]["path"] = "/data/models/model.onnx"
    sample["check"] = {}
    assert validate_report(sample) == []


def test_other_schema_version_is_reported_alone() -> None:
    assert validate_report({"schema_version": 2, "targets": "x"}) == [
        "schema_version: this edgekiln reads report schema version 1, got 2; read it with the "
        "edgekiln version that wrote it"
    ]


def test_not_an_object() -> None:
    assert validate_report([]) == ["report: expected a JSON object (the report), got [] (list)"]


def test_load_report_errors(tmp_path: Path, sample: dict[str, Any]) -> None:
    with pytest.raises(ReportError, match=r"report .*nope\.json does not exist; pass the report"):
        load_report(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "schema_version": 1,\n  oops\n}')
    with pytest.raises(ReportError, match=r"not valid JSON: .* at line 3, column 3"):
        load_report(bad)
    sample["targets"][0]["accuracy"] = "high"
    bad.write_text(json.dumps(sample))
    with pytest.raises(ReportError, match=r"1 problem; see docs/report-schema\.md.*\n  - targets"):
        load_report(bad)
    try:
        load_report(bad)
    except ReportError as e:
        assert e.problems == [
            'targets[0].accuracy: expected a fraction in [0, 1] or null, got "high" (string)'
        ]


def test_write_then_load_round_trip(tmp_path: Path, sample: dict[str, Any]) -> None:
    path = write_report(sample, tmp_path / "run" / "report.json")
    assert load_report(path) == sample
    text = path.read_text()
    assert text.startswith('{\n  "artifacts": [') and text.endswith("}\n")  # sorted, indent 2


def test_write_refuses_invalid_report_and_writes_nothing(tmp_path: Path) -> None:
    report = new_report()
    report["kind"] = "bake"
    with pytest.raises(ReportError, match=r"the report to write does not follow .*\n  - kind"):
        write_report(report, tmp_path / "report.json")
    assert list(tmp_path.iterdir()) == []


def test_new_report_rejects_unknown_kind() -> None:
    with pytest.raises(ReportError, match=r'kind must be "run" or "validate", got \'bake\''):
        new_report("bake")
