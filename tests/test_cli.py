"""The edgekiln command: targets, export, validate and check, with their exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekiln.cli import main

REPO = Path(__file__).parents[1]


def test_targets_lists_runtimes_and_boards(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("onnxruntime", "litert", "tflm", "mcu:nrf52840", "mcu:rp2040", "mcu:stm32h743"):
        assert name in out
    assert main(["targets", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in doc if t["kind"] == "mcu"} >= {"mcu:nucleo-l4r5zi", "mcu:stm32u575"}


def test_export_from_a_saved_graph(digits_run, tmp_path, capsys):
    out, _ = digits_run
    assert main(["export", str(out / "graph.npz"), str(tmp_path / "m.tflite")]) == 0
    assert (tmp_path / "m.tflite").read_bytes()[4:8] == b"TFL3"
    assert main(["export", str(out / "graph.npz"), str(tmp_path / "m.pb")]) == 2
    assert "use one of .onnx, .tflite" in capsys.readouterr().err


def test_validate_writes_a_report_and_raw_outputs(digits_run, tmp_path, capsys):
    from sklearn.datasets import load_digits

    out, _ = digits_run
    digits = load_digits()
    x = (digits.images[:64] / 16.0).astype(np.float32)[:, None]
    np.savez(tmp_path / "d.npz", x_test=x, y_test=digits.target[:64])
    code = main(
        [
            "validate",
            str(out / "model.tflite"),
            str(out / "model.onnx"),
            "--data",
            str(tmp_path / "d.npz"),
            "--target",
            "tflm",
            "--target",
            "mcu:stm32h743",
            "--target",
            "onnxruntime",
            "--runs",
            "2",
            "--json",
            str(tmp_path / "v.json"),
            "--save-outputs",
            str(tmp_path / "o.npz"),
        ]
    )
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["kind"] == "validate" and len(report["targets"]) == 3
    assert all(t["accuracy"] > 0.8 for t in report["targets"])
    saved = np.load(tmp_path / "o.npz")
    assert saved["tflm"].dtype == np.int8 and saved["tflm"].shape == (64, 10)
    np.testing.assert_array_equal(saved["tflm"], saved["mcu:stm32h743"])
    assert "tflm vs mcu:stm32h743: 0 of 640 values differ" in capsys.readouterr().out


def test_validate_names_a_missing_artifact(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x_test=np.zeros((2, 1, 8, 8), np.float32))
    code = main(
        [
            "validate",
            str(tmp_path / "none.tflite"),
            "--data",
            str(tmp_path / "d.npz"),
            "--target",
            "tflm",
        ]
    )
    assert code == 2
    assert "none.tflite' does not exist" in capsys.readouterr().err


def test_check_pass_regression_and_unusable(digits_run, tmp_path, capsys):
    out, report = digits_run
    assert main(["check", str(out / "report.json"), "--baseline", str(out / "report.json")]) == 0

    worse = json.loads(json.dumps(report))
    worse["targets"][0]["accuracy"] -= 0.02
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    capsys.readouterr()
    code = main(["check", str(tmp_path / "worse.json"), "--baseline", str(out / "report.json")])
    assert code == 1
    assert "accuracy" in capsys.readouterr().out

    assert main(["check", str(tmp_path / "nope.json"), "--baseline", str(out / "report.json")]) == 2
    other = dict(report, schema_version=99)
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert (
        main(["check", str(tmp_path / "other.json"), "--baseline", str(out / "report.json")]) == 2
    )


def test_bad_recipe_exits_2_with_the_key_named(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nlr = 0\n")
    done = subprocess.run(
        [sys.executable, "-m", "edgekiln", "run", str(recipe), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert done.returncode == 2
    assert "[train] lr = 0 is not valid" in done.stderr


@pytest.mark.parametrize("argv", [["run", "--resume", "x", "--out", "y"]])
def test_resume_refuses_out(argv, capsys):
    assert main(argv) == 2
    assert "--resume DIR takes the recipe and directory of that run" in capsys.readouterr().err


def test_compare_names_the_first_layer_where_targets_part(digits_run, tmp_path, capsys):
    from sklearn.datasets import load_digits

    out, _ = digits_run
    digits = load_digits()
    np.savez(tmp_path / "d.npz", x_test=(digits.images[:8] / 16.0).astype(np.float32)[:, None])
    args = [str(out / "model.tflite"), "--data", str(tmp_path / "d.npz"), "--samples", "4"]
    assert (
        main(
            [
                "compare",
                *args,
                "--target",
                "tflm",
                "--target",
                "mcu:rp2040",
                "--json",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "c.json").read_text())
    text = capsys.readouterr().out
    assert f"identical on every compared tensor ({len(doc['layers'])} tensors)" in text
    assert doc["first_divergence"] is None and len(doc["layers"]) >= 5
    assert "part" not in text
    onnx = [str(out / "model.onnx"), *args, "--json", str(tmp_path / "o.json")]
    assert main(["compare", *onnx, "--target", "onnxruntime", "--target", "tflm"]) == 0
    text = capsys.readouterr().out
    doc = json.loads((tmp_path / "o.json").read_text())
    # ONNX Runtime rounds in float, TFLM in fixed point: on these 4 samples (measured) they part
    # at the first convolution, by one rounding step, and the CLI names that tensor.
    first = next(d for d in doc["layers"] if d["mismatches"])
    assert doc["first_divergence"] == first["name"] == doc["layers"][1]["name"]
    assert first["max_lsb"] == 1
    assert f"first tensor where they part: {first['name']}" in text
    assert "identical" not in text
    assert main(["compare", *args, "--target", "tflm"]) == 2
    assert "exactly two --target" in capsys.readouterr().err


def test_compare_with_no_tensor_in_common_is_unusable_input(digits_run, tmp_path, capsys):
    # A hand-built graph's ONNX against the run's TFLite: same input shape, no tensor name in
    # common, so nothing can be compared; that is not "identical".
    from edgekiln.exporters.onnx import write_onnx
    from edgekiln.ir.builder import GraphBuilder

    out, _ = digits_run
    x = np.random.default_rng(0).normal(0, 1, (4, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_test=x)
    b = GraphBuilder(x)
    other = write_onnx(b.build([b.conv(b.input, 2, 3)]), tmp_path / "other.onnx")
    argv = ["compare", str(other), str(out / "model.tflite"), "--data", str(tmp_path / "d.npz")]
    argv += ["--target", "onnxruntime", "--target", "tflm", "--json", str(tmp_path / "c.json")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "c.json").exists()
    assert captured.err.startswith(
        "edgekiln compare: error: no tensor could be matched between onnxruntime and tflm: no "
        "name is in both runs (2 in onnxruntime (e.g. input, t3); "
    )
    assert "so nothing was compared. Compare artifacts written from one graph" in captured.err


def test_compare_a_runs_trained_model_with_a_target(digits_run, capsys):
    out, _ = digits_run
    assert main(["compare", "--run", str(out), "--target", "mcu:nrf52840", "--samples", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("fake_quant vs mcu:nrf52840, 4 samples")
    # one rounding per op, in float (PyTorch) or fixed point (the simulator): at most 1 LSB per
    # tensor, 2 where two such moves meet in the residual add
    rows = [line.split() for line in text.splitlines()[2:] if line and line[0].isalnum()]
    assert all(int(r[3]) <= 2 for r in rows if len(r) > 3 and r[3].isdigit())
    assert main(["compare", "--target", "tflm"]) == 2
    assert "exactly two --target, or one with --run DIR; got 1" in capsys.readouterr().err
