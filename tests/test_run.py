"""`edgekiln run` end to end, in a reduced size: stages, run directory, resume, user models."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgekiln.config import ConfigError, parse_config
from edgekiln.ir import load_graph
from edgekiln.run import RunError, prepare_run_dir, run

REPO = Path(__file__).parents[1]


def test_run_directory_holds_every_file(digits_run):
    out, _ = digits_run
    names = {p.name for p in out.iterdir()}
    assert {
        "model.onnx",
        "model.tflite",
        "graph.npz",
        "report.json",
        "report.html",
        "manifest.json",
        "state.json",
    } <= names
    manifest = json.loads((out / "manifest.json").read_text())
    listed = json.dumps(manifest)
    assert "model.tflite" in listed and "report.json" in listed


def test_every_target_agrees_with_the_fake_quant_model(digits_run):
    _, report = digits_run
    assert report["training"]["fake_quant_accuracy"] > 0.85
    for target in report["targets"]:
        assert target["ok"], target["error"]
        # one LSB per requantizing op at most; measured: max 1 at the output
        assert target["lsb"]["max"] <= 2, target["name"]
        assert target["agreement"] >= 0.99, target["name"]
    by_pair = {(p["a"], p["b"]): p for p in report["pairwise"]}
    assert by_pair[("tflm", "mcu:nrf52840")]["differing"] == 0  # the simulator is bit-exact


def test_report_records_sparsity_and_quantization_error(digits_run):
    _, report = digits_run
    assert report["sparsity"]["total"] == pytest.approx(0.5, abs=0.02)
    assert all(
        row["sqnr_db"] is None or row["sqnr_db"] > 10 for row in report["quantization"]["layers"]
    )
    mcu = next(t for t in report["targets"] if t["name"] == "mcu:nrf52840")
    assert mcu["latency_kind"] == "estimated" and mcu["arena_bytes"] > 0


def test_a_used_directory_is_never_overwritten(digits_run):
    out, _ = digits_run
    with pytest.raises(RunError, match="is not empty; choose another --out, resume it"):
        prepare_run_dir(out)


def _whole(message: str) -> str:
    """A pattern matching exactly ``message``."""
    return f"^{re.escape(message)}$"


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A directory with a user's model module (usernet.py) and data (data.npz, 1x3x4 inputs)."""
    (tmp_path / "usernet.py").write_text(
        "import torch.nn as nn\n"
        "def make(hidden=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(),\n"
        "                         nn.Linear(hidden, 3))\n"
        "def broken():\n"
        "    raise RuntimeError('no weights here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 1, 3, 4)).astype(np.float32)
    y = (x.reshape(300, -1)[:, :3].argmax(axis=1)).astype(np.int64)
    np.savez(
        tmp_path / "data.npz", x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:]
    )
    np.savez(tmp_path / "test_only.npz", x_test=x[240:], y_test=y[240:])
    np.savez(tmp_path / "empty_test.npz", x_test=x[:0], y_test=y[:0])
    square = rng.normal(size=(40, 1, 4, 4)).astype(np.float32)  # 16 features: not usernet's 12
    np.savez(tmp_path / "square.npz", x_train=square, y_train=y[:40], x_test=square, y_test=y[:40])
    return tmp_path


def test_user_model_and_npz_through_a_recipe(user_project):
    tmp_path = user_project
    doc = {
        "model": {"source": "usernet:make", "kwargs": {"hidden": 16}},
        "data": {"source": "data.npz"},
        "train": {"float_epochs": 5, "qat_epochs": 1, "lr": 0.01},
        "export": {"formats": ["tflite"]},
        "targets": {
            "names": ["mcu:rp2040", "mcu:my-m4"],
            "boards": [
                {
                    "name": "my-m4",
                    "core": "cortex-m4",
                    "clock_hz": 48_000_000,
                    "sram_bytes": 32 * 1024,
                    "flash_bytes": 128 * 1024,
                    "flash_wait_states": 1,
                }
            ],
        },
    }
    report = run(parse_config(doc, tmp_path), prepare_run_dir(tmp_path / "out"))
    assert all(t["ok"] for t in report["targets"])
    assert report["model"]["input_shape"] == [1, 3, 4]
    mine = report["targets"][1]  # a board of the recipe's own, simulated like the built-in ones
    assert mine["name"] == "mcu:my-m4" and mine["board"]["clock_hz"] == 48_000_000
    assert mine["latency_kind"] == "estimated" and mine["arena_bytes"] < 32 * 1024

    doc["model"] = {"source": "usernet:broken"}
    with pytest.raises(ConfigError, match="usernet:broken.*raised RuntimeError: no weights here"):
        run(parse_config(doc, tmp_path), prepare_run_dir(tmp_path / "out2"))
    doc["model"] = {"source": "usernet:make", "input_shape": [1, 28, 28]}
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)|\[1, 28, 28\]"):
        run(parse_config(doc, tmp_path), prepare_run_dir(tmp_path / "out3"))


def _tiny(project: Path, **tables) -> dict:
    """A recipe for usernet on data.npz, validated on one simulated board: seconds, not minutes."""
    doc = {
        "model": {"source": "usernet:make"},
        "data": {"source": "data.npz"},
        "train": {"float_epochs": 1, "qat_epochs": 1, "lr": 0.01},
        "export": {"formats": ["tflite"]},
        "targets": {"names": ["mcu:rp2040"]},
    }
    return {**doc, **tables}


def test_a_two_of_four_recipe_without_target_reports_what_sparsity_buys(user_project):
    doc = _tiny(user_project, sparsity={"pattern": "2:4"})
    out = user_project / "out"
    with pytest.warns(UserWarning, match="they stay dense: 1"):  # Linear(12, 8) after Flatten
        report = run(parse_config(doc, user_project), prepare_run_dir(out))
    assert report["recipe"]["sparsity"] == {"pattern": "2:4", "target": 0.5}
    assert report["sparsity"]["total"] == pytest.approx(12 / 120, abs=0.02)  # Linear(8, 3)/2
    before_after = report["sparsity"]["before_after"]  # int8 zeros, before and after pruning
    assert before_after["sparse"]["weight_sparsity"] == pytest.approx(12 / 120, abs=0.02)
    assert before_after["dense"]["weight_sparsity"] < before_after["sparse"]["weight_sparsity"]
    assert "What sparsity buys" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"source": "nopkg_edgekiln_test:make"},
            "[model] source = 'nopkg_edgekiln_test:make': cannot import 'nopkg_edgekiln_test': "
            "No module named 'nopkg_edgekiln_test'; install the package, or run from (or put on "
            "PYTHONPATH) the directory that holds the module",
        ),
        (
            {"source": "usernet:build"},
            "[model] source = 'usernet:build': usernet has no callable 'build'; name a function "
            'or class defined in usernet, as "usernet:NAME"',
        ),
    ],
)
def test_a_model_source_that_cannot_be_built(user_project, model, message):
    doc = _tiny(user_project, model=model)
    with pytest.raises(ConfigError, match=_whole(message)):
        run(parse_config(doc, user_project), prepare_run_dir(user_project / "out"))


def test_data_of_the_wrong_shape_names_both_shapes(user_project):
    doc = _tiny(user_project, data={"source": "square.npz"})
    with pytest.raises(ConfigError) as raised:  # usernet declares no shape
        run(parse_config(doc, user_project), prepare_run_dir(user_project / "out"))
    assert re.fullmatch(
        re.escape(
            "[model] source = 'usernet:make' does not accept data of shape [1, 4, 4] (the "
            "data's shape; no [model] input_shape and the model's expected input shape is not "
            "declared): RuntimeError: "
        )
        + ".+"  # torch's own words
        + re.escape("; declare the shape the model takes as [model] input_shape to check the data"),
        str(raised.value),
    )

    doc = _tiny(user_project, model={"source": "edgekiln.models:small_cnn"})  # 1x28x28 model
    with pytest.raises(ConfigError) as raised:
        run(parse_config(doc, user_project), prepare_run_dir(user_project / "out2"))
    assert re.fullmatch(
        re.escape(
            "[model] source = 'edgekiln.models:small_cnn' does not accept data of shape "
            "[1, 3, 4] (the data's shape; no [model] input_shape, but the model expects "
            "[1, 28, 28]): RuntimeError: "
        )
        + ".+"
        + re.escape("; reshape the data or set [model] kwargs to fit it"),
        str(raised.value),
    )


def test_data_without_a_train_split_or_test_samples(user_project):
    source = str(user_project / "test_only.npz")
    doc = _tiny(user_project, data={"source": "test_only.npz"})
    with pytest.raises(ConfigError, match=_whole(
        f"[data] source = {source!r} has no training split (the keys x_train and y_train are "
        "missing), but [train] float_epochs = 1, qat_epochs = 1 train on it; add x_train and "
        "y_train to the file, or set [train] float_epochs and qat_epochs to 0 to only calibrate "
        "on x_test"
    )):  # fmt: skip
        run(parse_config(doc, user_project), prepare_run_dir(user_project / "out"))
    assert not any((user_project / "out").iterdir())  # nothing to resume: state.json taken back
    prepare_run_dir(user_project / "out")  # so the same --out works again, without --force

    doc["train"] = {"float_epochs": 0, "qat_epochs": 0}  # calibration alone reads x_test
    report = run(parse_config(doc, user_project), prepare_run_dir(user_project / "calibrated"))
    assert report["data"]["n_train"] == 0 and report["targets"][0]["ok"]

    source = str(user_project / "empty_test.npz")
    doc = _tiny(user_project, data={"source": "empty_test.npz"})
    with pytest.raises(ConfigError, match=_whole(
        f"[data] source = {source!r}: x_test has shape (0, 1, 3, 4), expected (N, *input_shape) "
        "with N >= 1 and at least 2 dimensions, e.g. (N, 1, 28, 28) for grey 28x28 images"
    )):  # fmt: skip
        run(parse_config(doc, user_project), prepare_run_dir(user_project / "out2"))


def test_force_overwrites_a_previous_run_only(tmp_path):
    old = tmp_path / "old-run"
    (old / "checkpoints").mkdir(parents=True)
    (old / "state.json").write_text("{}")
    (old / "checkpoints" / "float.pt").write_bytes(b"")
    assert prepare_run_dir(old, force=True) == old and not any(old.iterdir())

    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "notes" / "todo.txt").write_text("back up")
    with pytest.raises(RunError, match=_whole(
        f"run directory {str(mine)!r} is not empty and is not an edgekiln run directory (it has "
        "none of state.json, manifest.json, report.json), so --force does not delete it; choose "
        "another --out, or empty the directory yourself"
    )):  # fmt: skip
        prepare_run_dir(mine, force=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert (mine / "notes" / "todo.txt").exists()


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "edgekiln", *args],
        cwd=str(REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


FLOAT_EPOCHS, QAT_EPOCHS = 4, 2
# digits in 23 batches an epoch; the polynomial schedule updates the masks on steps 0, 10, ...,
# 40, across the QAT epoch boundary: a resume that lost a mask's step counter (or a mask, or an
# observer's range) would update other steps and end in another graph
KILLABLE_RECIPE = (
    '[model]\nkwargs = {input_size = 8}\n[data]\nsource = "digits"\n'
    f"[train]\nfloat_epochs = {FLOAT_EPOCHS}\nqat_epochs = {QAT_EPOCHS}\n"
    '[sparsity]\nschedule = "polynomial"\ntarget = 0.5\nend_step = 40\nfrequency = 10\n'
    '[targets]\nnames = ["tflm"]\nlatency_runs = 1\n'
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """The killable recipe, and the directory of its run from start to end without a kill."""
    root = tmp_path_factory.mktemp("resume")
    recipe = root / "r.toml"
    recipe.write_text(KILLABLE_RECIPE)
    whole = root / "whole"
    done = _cli("run", str(recipe), "--out", str(whole), "--quiet")
    assert done.wait(600) == 0, done.stdout.read().decode()
    return recipe, whole


def _kill_after(proc: subprocess.Popen, run_dir: Path, stage: str, epochs: int) -> dict:
    """SIGKILL ``proc`` once ``stage`` has checkpointed ``epochs`` epochs; the state it left."""
    state = run_dir / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epochs"].get(stage, 0) >= epochs:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(state.read_text())


@pytest.mark.parametrize(
    ("stage", "epochs", "of"),
    [("float", 2, FLOAT_EPOCHS), ("qat", 1, QAT_EPOCHS)],
    ids=["during float training", "during QAT fine-tuning"],
)
def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path, stage, epochs, of):
    recipe, whole = uninterrupted
    broken = tmp_path / "broken"
    proc = _cli("run", str(recipe), "--out", str(broken), "--quiet")
    left = _kill_after(proc, broken, stage, epochs)
    assert not (broken / "manifest.json").exists()  # an interrupted run never looks complete
    # killed part-way through the phase: its checkpoint is the only way to the same result
    assert epochs <= left["epochs"][stage] < of and stage not in left["completed"], left

    resumed = _cli("run", "--resume", str(broken), "--quiet")
    assert resumed.wait(600) == 0, resumed.stdout.read().decode()
    a, b = load_graph(whole / "graph.npz"), load_graph(broken / "graph.npz")
    for name, tensor in a.tensors.items():
        if tensor.data is not None:
            np.testing.assert_array_equal(tensor.data, b.tensors[name].data, err_msg=name)
        assert tensor.quant.equals(b.tensors[name].quant), name
    assert (whole / "model.tflite").read_bytes() == (broken / "model.tflite").read_bytes()
    ra = json.loads((whole / "report.json").read_text())
    rb = json.loads((broken / "report.json").read_text())
    assert ra["training"]["loss_history"] == rb["training"]["loss_history"]
    assert ra["sparsity"]["total"] == rb["sparsity"]["total"]
    assert ra["targets"][0]["accuracy"] == rb["targets"][0]["accuracy"]


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    from edgekiln.run import load_run_config_for_resume

    with pytest.raises(RunError, match="has no state.json: it is not an edgekiln run directory"):
        load_run_config_for_resume(tmp_path)


def test_channel_pruning_sweep_and_prune_then_qat_reach_the_report(tmp_path):
    doc = {
        "model": {"kwargs": {"input_size": 8}},
        "data": {"source": "digits"},
        "train": {"float_epochs": 2, "prune_epochs": 1, "qat_epochs": 1, "lr": 0.005},
        "sparsity": {
            "target": 0.5,
            "pattern": "channel",
            "mode": "prune_then_qat",
            "sweep": [0.25, 0.75],
        },
        "export": {"formats": ["tflite"]},
        "targets": {"names": ["mcu:nrf52840"]},
    }
    out = tmp_path / "sweep"
    report = run(parse_config(doc, REPO), prepare_run_dir(out))
    before_after = report["sparsity"]["before_after"]
    # whole filters removed at capture: the artifact shrinks and does fewer MACs
    assert before_after["sparse"]["tflite_bytes"] < before_after["dense"]["tflite_bytes"]
    assert before_after["sparse"]["macs"] < before_after["dense"]["macs"]
    assert before_after["sparse"]["estimated_ms"] < before_after["dense"]["estimated_ms"]
    assert [p["sparsity"] for p in report["sweep"]] == [0.25, 0.75]
    assert report["sweep"][1]["macs"] < report["sweep"][0]["macs"]
    page = (out / "report.html").read_text()
    assert "What sparsity buys" in page and "Sparsity sweep" in page
    assert report["targets"][0]["ok"]


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_any_file(tmp_path):
    from edgekiln.distributed import DistContext
    from edgekiln.run import check_ranks

    config = parse_config({"train": {"batch_size": 63}}, tmp_path)
    check_ranks(config, DistContext())  # one process takes any batch
    check_ranks(config, DistContext(rank=0, world_size=3, backend="gloo"))
    with pytest.raises(ConfigError, match=_whole(
        "[train] batch_size = 63 is the global batch and must split evenly over the 2 ranks "
        "torchrun started (each rank takes batch_size / 2): use batch_size = 62 or 64, or a "
        "number of processes that divides 63"
    )):  # fmt: skip
        run(config, tmp_path / "never", ctx=DistContext(rank=0, world_size=2, backend="gloo"))
    assert not (tmp_path / "never").exists()


def test_a_run_that_failed_after_a_checkpoint_keeps_its_state(tmp_path):
    from edgekiln.run import STATE_FILE, _forget_unstarted, _State

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "float.pt").write_bytes(b"x")
    (tmp_path / STATE_FILE).write_text("{}")
    _forget_unstarted(tmp_path, _State(recipe={}, base=str(tmp_path), epochs={"float": 1}))
    assert (tmp_path / STATE_FILE).is_file() and (tmp_path / "checkpoints" / "float.pt").is_file()


def test_an_interrupted_run_keeps_its_state_even_before_a_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C tells the user to --resume, so an early interrupt must leave state.json behind."""
    from edgekiln import run as run_module

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module._Run, "go", interrupted)
    out = prepare_run_dir(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        run(parse_config({}, tmp_path), out)
    assert (out / "state.json").is_file()
