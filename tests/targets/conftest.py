"""Fixtures shared by the target tests."""

import pytest

from edgekiln.exporters.tflite import write_tflite
from tests.formats.tflite_cases import CASES, case_graph


@pytest.fixture(scope="session")
def tflite_case_artifacts(tmp_path_factory):
    """Every op case of tests/formats/tflite_cases written once as .tflite, by case name."""
    root = tmp_path_factory.mktemp("tflite_cases")
    return {name: write_tflite(case_graph(name), root / f"{name}.tflite") for name in CASES}
