"""manifest.json: write, verify, detect tampering."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

from edgekiln.report import manifest as manifest_module
from edgekiln.report.manifest import verify_manifest, write_manifest
from edgekiln.report.schema import ReportError


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "artifacts").mkdir(parents=True)
    (run / "report.json").write_text("{}\n")
    (run / "artifacts" / "model.onnx").write_bytes(b"\x08\x07onnx")
    (run / "artifacts" / "model.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3")
    (run / ".model.onnx.abc123.tmp").write_bytes(b"half-written")  # an interrupted write
    return run


def test_doctests() -> None:
    assert doctest.testmod(manifest_module, raise_on_error=False).failed == 0


def test_round_trip(run_dir: Path) -> None:
    path = write_manifest(run_dir)
    assert path == run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    assert [f["path"] for f in manifest["files"]] == [
        "artifacts/model.onnx",
        "artifacts/model.tflite",
        "report.json",
    ]
    assert manifest["files"][2] == {
        "path": "report.json",
        "bytes": 3,
        "sha256": "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356",
    }
    assert verify_manifest(run_dir) == []
    write_manifest(run_dir)  # rewriting does not list the manifest itself
    assert verify_manifest(run_dir) == []


def test_tamper_detection(run_dir: Path) -> None:
    write_manifest(run_dir)
    (run_dir / "artifacts" / "model.onnx").write_bytes(b"\x08\x07onnX")  # same size
    (run_dir / "artifacts" / "model.tflite").unlink()
    (run_dir / "notes.txt").write_text("added later")
    problems = verify_manifest(run_dir)
    assert len(problems) == 3
    assert problems[0].startswith("artifacts/model.onnx: changed (6 B, sha256 ")
    assert problems[1].startswith("artifacts/model.tflite: missing (listed in manifest.json")
    assert problems[2].startswith("notes.txt: extra (in ")


def test_missing_directory_or_manifest(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"run directory .*nope does not exist or is not a dir"):
        write_manifest(tmp_path / "nope")
    with pytest.raises(ReportError, match=r"manifest.json does not exist; write it with "):
        verify_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"files": 3}')
    with pytest.raises(ReportError, match=r"is not an edgekiln manifest version 1"):
        verify_manifest(tmp_path)
