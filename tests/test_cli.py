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
    # each entry says what it is: the raw tensor, its real values and the output grid
    names = ("tflm", "mcu:stm32h743", "onnxruntime")
    parts = ("", ":real", ":scale", ":zero_point")
    assert set(saved.files) == {name + part for name in names for part in parts}
    assert saved["onnxruntime"].dtype == np.float32  # the float-output ONNX model's own
    np.testing.assert_array_equal(saved["onnxruntime:real"], saved["onnxruntime"])
    for name in names:
        scale, zero_point = saved[f"{name}:scale"], saved[f"{name}:zero_point"]
        assert scale.shape == zero_point.shape == ()
        assert scale.dtype == np.float32 and zero_point.dtype == np.int32
        assert saved[f"{name}:real"].dtype == np.float32
    real = saved["tflm:scale"] * (saved["tflm"] - saved["tflm:zero_point"])
    np.testing.assert_array_equal(saved["tflm:real"], real.astype(np.float32))
    # ONNX Runtime's float outputs sit on the same grid as TFLM's integers (within rounding)
    onnx_ints = saved["onnxruntime"] / saved["onnxruntime:scale"] + saved["onnxruntime:zero_point"]
    assert np.abs(np.round(onnx_ints) - saved["tflm"]).max() <= 1
    mcu = next(t for t in report["targets"] if t["name"] == "mcu:stm32h743")
    assert mcu["details"]["flash_wait_states"] == 4
    assert mcu["details"]["flash_wait_states_assumed"] is False


MINE = (
    '[[boards]]\nname = "mine"\ncore = "cortex-m7"\nclock_hz = 216_000_000\n'
    "sram_bytes = 327680\nflash_bytes = 1048576\nflash_wait_states = 7\n"
)
BUILTIN = "alif-e7-hp, nrf52840, nucleo-l4r5zi, rp2040, stm32h743, stm32u575"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A small int8 CNN artifact and data for it (a hand-built graph: no training needed)."""
    from edgekiln.exporters.tflite import write_tflite
    from tests.targets.mcu import graphs

    root = tmp_path_factory.mktemp("cli-boards")
    path = write_tflite(graphs.every_op_cnn(), root / "cnn.tflite")
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 12, 12)).astype(np.float32)
    np.savez(root / "d.npz", x_test=x, y_test=np.arange(4))
    return path, root / "d.npz"


@pytest.mark.parametrize("form", ["boards", "recipe"])
def test_validate_runs_boards_of_a_boards_file_or_a_recipe(cnn, tmp_path, form, capsys):
    path, data = cnn
    boards = tmp_path / "b.toml"
    text = MINE if form == "boards" else MINE.replace("[[boards]]", "[[targets.boards]]")
    boards.write_text(text if form == "boards" else '[targets]\nnames = ["mcu:mine"]\n' + text)
    argv = ["validate", str(path), "--data", str(data), "--target", "mcu:mine"]
    argv += ["--target", "mcu:rp2040", "--boards", str(boards), "--json", str(tmp_path / "v.json")]
    assert main(argv) == 0, capsys.readouterr()
    report = json.loads((tmp_path / "v.json").read_text())
    mine, rp2040 = report["targets"]
    assert mine["name"] == "mcu:mine" and mine["ok"], mine["error"]
    assert mine["board"] == {
        "name": "mine", "core": "cortex-m7", "clock_hz": 216_000_000, "sram_bytes": 327680,
        "flash_bytes": 1048576,
    }  # fmt: skip
    assert mine["details"]["flash_wait_states"] == 7
    assert mine["details"]["flash_wait_states_assumed"] is False
    assert rp2040["name"] == "mcu:rp2040" and rp2040["details"]["flash_wait_states"] == 8
    assert "mcu:mine vs mcu:rp2040: 0 of 40 values differ" in capsys.readouterr().out


def test_validate_flags_a_board_without_wait_states(cnn, tmp_path, capsys):
    path, data = cnn
    boards = tmp_path / "b.toml"
    boards.write_text(MINE.replace("flash_wait_states = 7\n", ""))
    argv = ["validate", str(path), "--data", str(data), "--target", "mcu:mine"]
    code = main([*argv, "--boards", str(boards), "--json", str(tmp_path / "v.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "edgekiln validate: warning: board 'mine' gives no flash_wait_states: its latency" in err
    assert "UserWarning" not in err and ".py:" not in err  # a line for people, not a traceback
    (mine,) = json.loads((tmp_path / "v.json").read_text())["targets"]
    assert mine["details"]["flash_wait_states"] == 5
    assert mine["details"]["flash_wait_states_assumed"] is True


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        (None, "mcu:mine", "boards file '{b}' does not exist; name a .toml file holding "
         "[[boards]] tables (or a recipe with [[targets.boards]])"),
        ("[[boards]\nname = 1\n", "mcu:mine", "boards file '{b}' is not valid TOML: "),
        ('[[board]]\nname = "mine"\n', "mcu:mine", "boards file '{b}' holds no boards: "
         "expected [[boards]] tables (or a recipe's [[targets.boards]]), found board; add one "
         "[[boards]] table per board with the keys name, core, clock_hz, sram_bytes and "
         "flash_bytes"),
        (MINE.replace("= 7", "= 16"), "mcu:mine", "boards file '{b}': [[boards]] number 1 "
         "(name = 'mine'): board key 'flash_wait_states' = 16 is invalid: it must be a whole "
         "number from 0 to 15 (the CPU cycles a flash read waits at clock_hz, from the part's "
         "flash latency table; a 4-bit latency field holds no more), or left out, in which "
         "case the latency estimate assumes the anchor board's and says so"),
        (MINE, "mcu:esp32", f"--target mcu:esp32: unknown board 'esp32'; built-in boards: "
         f"{BUILTIN}; boards in '{{b}}': mine. Pick one of those, or describe the board in a "
         "[[boards]] table of a TOML file and pass it as --boards FILE.toml"),
        ("no file", "mcu:mine", f"--target mcu:mine: unknown board 'mine'; built-in boards: "
         f"{BUILTIN}; no --boards file given. Pick one of those, or describe the board in a "
         "[[boards]] table of a TOML file and pass it as --boards FILE.toml"),
    ],
)  # fmt: skip
def test_validate_boards_errors_exit_2_before_any_target_runs(
    tmp_path, capsys, text, target, message
):
    (tmp_path / "m.tflite").write_bytes(b"")  # never read: the boards are checked first
    boards = tmp_path / "b.toml"
    argv = ["validate", str(tmp_path / "m.tflite"), "--data", str(tmp_path / "none.npz")]
    argv += ["--target", target, "--json", str(tmp_path / "v.json")]
    if text != "no file":
        argv += ["--boards", str(boards)]
        if text is not None:
            boards.write_text(text)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "v.json").exists()
    expected = "edgekiln validate: error: " + message.format(b=boards)
    if message.endswith(": "):  # the TOML parser's own words follow
        assert captured.err.startswith(expected)
    else:
        assert captured.err == expected + "\n"


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
